"""LogitMonitor under 2-process DDP equals one process on the union of both ranks' training batches of the step read
(the statistics are reduced by name: distributed.all_reduce_named)."""

import json
import math

import pytest
import torch
from torch import nn

from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.logits import attention_logits, top_right_singular_vector
from tests.callbacks.test_logits import TinyLM
from tests.helpers.ddp import load_dumps, run_ddp_script

pytestmark = pytest.mark.timeout(300)


def test_two_process_ranks_equal_single_process_on_the_union_of_their_batches(tmp_path):
    run_ddp_script("ddp_logits_script.py", tmp_path)
    metrics, _, weights = load_dumps(tmp_path)
    union = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    model = TinyLM(dropout=0.0).double()
    model.load_state_dict(weights)
    layer = model.blocks.layers[0]
    maxima, log_z, inputs = [], [], []
    with operator_mode(model, "eval"), torch.no_grad():
        for (window,) in union:
            tokens = window[:, :-1]
            h = layer.norm1(model.embed(tokens))
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1]).isneginf()
            maxima.append(float(attention_logits(layer.self_attn, h, h).masked_fill(mask, -math.inf).max()))
            log_z.append(torch.logsumexp(model(tokens), -1).reshape(-1))
            inputs.append(model.blocks(model.embed(tokens), mask=mask, is_causal=True).reshape(-1, 16))
    m = metrics[0]
    assert m["landscape/logits/attention/max"] == pytest.approx(max(maxima), rel=1e-10)
    assert m["landscape/logits/output/log_partition"] == pytest.approx(float(torch.cat(log_z).mean()), rel=1e-10)
    v, _ = top_right_singular_vector(model.head.weight, iterations=2000, tol=1e-13)
    projection = torch.cat(inputs) @ v
    expected = max(int((projection > 0).sum()), int((projection < 0).sum())) / int((projection != 0).sum())
    assert m["landscape/logits/alignment/head/sign_fraction"] == pytest.approx(expected, abs=1.5 / len(projection))


def test_ranks_that_ran_different_attention_modules_agree_by_name(tmp_path):
    # only rank 0 runs `attn_b`: its maximum is rank 0's, `attn_a`'s and the output's are over both ranks, and every
    # rank logs the same keys (a misaligned or skipped collective would fail or hang the subprocess)
    from tests.callbacks.ddp_logits_modules_script import TwoAttentions

    run_ddp_script("ddp_logits_modules_script.py", tmp_path)
    metrics, _, weights = load_dumps(tmp_path)
    model = TwoAttentions().double()
    model.load_state_dict(weights)
    maxima, log_z = {"attn_a": [], "attn_b": []}, []
    with torch.no_grad():
        for rank in (0, 1):
            (window,) = torch.load(tmp_path / f"batch_rank{rank}.pt")
            tokens = window[:, :-1]
            h = model.embed(tokens)
            maxima["attn_a"].append(float(attention_logits(model.attn_a, h, h).max()))
            h = h + model.attn_a(h, h, h, need_weights=False)[0]
            if rank == 0:
                maxima["attn_b"].append(float(attention_logits(model.attn_b, h, h).max()))
            log_z.append(torch.logsumexp(model(tokens, second=rank == 0), -1).reshape(-1))
    m = metrics[0]
    for name, values in maxima.items():
        assert m[f"landscape/logits/attention/{name}/max"] == pytest.approx(max(values), rel=1e-10)
    assert m["landscape/logits/attention/max"] == pytest.approx(max(maxima["attn_a"] + maxima["attn_b"]), rel=1e-10)
    assert m["landscape/logits/output/log_partition"] == pytest.approx(float(torch.cat(log_z).mean()), rel=1e-10)


def test_a_rank_whose_forward_skipped_attention_keeps_capturing_like_the_others(tmp_path):
    # the "no attention in this model" decision is taken on the reduced names: rank 1 captured nothing, rank 0 did,
    # so neither rank stops arming the capture (and both log rank 0's attention keys)
    run_ddp_script("ddp_logits_absent_script.py", tmp_path)
    dumps = [json.loads((tmp_path / f"absent_rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["absent"] for d in dumps] == [False, False]
    assert dumps[0]["attention_keys"] and dumps[0]["attention_keys"] == dumps[1]["attention_keys"]
