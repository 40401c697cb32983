"""AttentionCapture: attention logits of every implementation against float64 hand computations, no interference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape.core.attention import (
    AttentionCapture,
    attention_sums,
    capture_attention,
    looks_like_attention,
    sdpa_logits,
)
from lightning_landscape.core.logits import attention_logits


def hand_statistics(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[float, float, int]:
    """(max, mean entropy per query row with an allowed key, rows) by a plain loop-free float64 computation."""
    logits, allowed = logits.double(), allowed.expand_as(logits)
    rows = allowed.any(-1)
    maximum = float(logits[allowed].max())
    weights = torch.exp(logits - logits.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True)) * allowed
    weights = weights / weights.sum(-1, keepdim=True)
    entropy = -(weights * torch.log(torch.where(weights > 0, weights, torch.ones_like(weights)))).sum(-1)
    return maximum, float(entropy[rows].sum() / rows.sum()), int(rows.sum())


def captured(capture: AttentionCapture, name: str) -> tuple[float, float, int]:
    s = capture.sums[name]
    return float(s.maximum), float(s.entropy_sum / s.rows), int(s.rows)


class SdpaBlock(nn.Module):
    def forward(self, q, k, v, **kwargs):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = SdpaBlock()

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def _qkv(heads_q=4, heads_k=4, length=5, source=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads_q, length, dim, generator=g, dtype=torch.float64) * 3
    k = torch.randn(2, heads_k, source, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, heads_k, source, dim, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "bool_mask", "float_mask", "hf_min_mask", "gqa", "gqa_causal_scale"],
)
def test_sdpa_logits_equal_a_float64_hand_computation(case):
    gqa = case.startswith("gqa")
    q, k, v = _qkv(heads_k=2 if gqa else 4, length=6 if "causal" in case else 5)
    length, source = q.shape[-2], k.shape[-2]
    kwargs: dict = {}
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, length, source, generator=g) > 0.4
    keep[..., 0] = True  # every query keeps a key
    bias = torch.randn(2, 1, length, source, generator=g, dtype=torch.float64)
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = keep
    elif case == "float_mask":  # an additive bias with -inf at masked positions (ALiBi-like)
        kwargs["attn_mask"] = bias.masked_fill(~keep, -math.inf)
    elif case == "hf_min_mask":  # HuggingFace's eager-style mask: finfo.min where masked
        keep[0, :, 2] = False  # a fully masked query row: skipped, as with -inf (finfo.min is no real logit)
        kwargs["attn_mask"] = torch.zeros_like(bias).masked_fill(~keep, torch.finfo(torch.float64).min)
    elif case == "gqa":
        kwargs["enable_gqa"] = True
    else:
        kwargs.update(enable_gqa=True, is_causal=True, scale=0.3)
    model = Wrapper()
    reference = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with capture_attention(model) as capture:
        out = model(q, k, v, **kwargs)
    assert torch.equal(out, reference)  # the call itself is untouched
    # hand computation: repeat each key head for its H_q/H_k query heads, scale, mask
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ kk.transpose(-1, -2)) * kwargs.get("scale", 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(2, q.shape[1], length, source, dtype=torch.bool)
    if kwargs.get("is_causal"):
        allowed &= torch.ones(length, source, dtype=torch.bool).tril()
    if case in ("bool_mask", "float_mask", "hf_min_mask"):
        allowed &= keep
    if case == "float_mask":
        logits = logits + bias
    expected = hand_statistics(logits, allowed)
    got = captured(capture, "block")
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    assert got[1] == pytest.approx(expected[1], rel=1e-10)
    assert got[2] == expected[2]
    if case == "hf_min_mask":
        return  # sdpa attends uniformly in the fully masked row; the softmax below would be nan there
    # and the softmax of the captured logits is what sdpa attended with
    logits_c, allowed_c = sdpa_logits(
        q,
        k,
        kwargs.get("attn_mask"),
        bool(kwargs.get("is_causal")),
        kwargs.get("scale"),
        bool(kwargs.get("enable_gqa")),
    )
    weights = torch.softmax(logits_c.masked_fill(~allowed_c, -math.inf), -1)
    vv = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    torch.testing.assert_close(weights @ vv, reference, rtol=1e-10, atol=1e-12)


def test_module_names_come_from_the_innermost_running_module_and_root_outside():
    model = Wrapper()
    q, k, v = _qkv()
    with capture_attention(model) as capture:
        model(q, k, v)
        F.scaled_dot_product_attention(q, k, v)  # no module of the model running
        model(q, k, v)
    assert sorted(capture.sums) == ["block", "root"]
    assert capture.sums["block"].calls == 2 and capture.sums["root"].calls == 1
    assert int(capture.sums["block"].rows) == 2 * 2 * 4 * 5


def test_include_filter_and_batch_row_subsample():
    model = Wrapper()
    q, k, v = _qkv()
    q[1] *= 10  # the largest logits are in the second batch row
    with capture_attention(model, include=lambda name: name != "block") as capture:
        model(q, k, v)
    assert capture.sums == {}
    with capture_attention(model, entropy_samples=1) as capture:
        model(q, k, v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    every = torch.ones(2, 4, 5, 6, dtype=torch.bool)
    maximum, _, _ = hand_statistics(logits, every)  # the maximum: over every batch row (here: the second's)
    _, entropy, rows = hand_statistics(logits[:1], every[:1])  # the entropy: over the first row only
    assert maximum > hand_statistics(logits[:1], every[:1])[0]
    assert captured(capture, "block") == pytest.approx((maximum, entropy, rows), rel=1e-10)


class EagerBlock(nn.Module):
    """nanoGPT's manual path: masked_fill(-inf) then softmax over the last dim of (B, H, L, S)."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        weights = F.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        torch.softmax(scores[0, 0], dim=-1)  # 2-D: not attention scores, not read
        scores.softmax(dim=1)  # not over the keys: not read
        return weights @ v


def test_eager_softmax_reads_its_input_and_skips_other_softmaxes():
    model = nn.Sequential(EagerBlock())
    q, k, v = _qkv(length=6, source=6)
    with capture_attention(model) as capture:
        model[0](q, k, v)
    assert list(capture.sums) == ["0"] and capture.sums["0"].calls == 1
    expected = hand_statistics(q @ k.transpose(-1, -2) / math.sqrt(8), torch.ones(6, 6, dtype=torch.bool).tril())
    assert captured(capture, "0") == pytest.approx(expected, rel=1e-10)


def _gpt2(implementation: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=50,
        n_positions=32,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    with torch.no_grad():  # larger logits than the init's, so the maximum is not near 0
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_huggingface_gpt2_eager_and_sdpa_equal_a_float64_hand_computation(implementation):
    model = _gpt2(implementation)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[1, 5:] = 0  # right padding: the second sample's last two keys are masked
    qkv = {}
    hooks = [
        block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: qkv.__setitem__(i, out.detach()))
        for i, block in enumerate(model.transformer.h)
    ]
    reference = model(input_ids=ids, attention_mask=padding).logits
    for hook in hooks:
        hook.remove()
    with capture_attention(model) as capture:
        logits = model(input_ids=ids, attention_mask=padding).logits
    assert torch.equal(logits, reference)
    assert sorted(capture.sums) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() & padding.bool()[:, None, None, :]
    for i in range(2):
        q, k, _ = qkv[i].split(16, dim=-1)
        q = q.reshape(2, 7, 2, 8).transpose(1, 2)
        k = k.reshape(2, 7, 2, 8).transpose(1, 2)
        expected = hand_statistics(q @ k.transpose(-1, -2) / math.sqrt(8), allowed)
        got = captured(capture, f"transformer.h.{i}.attn")
        assert got[0] == pytest.approx(expected[0], rel=1e-12)
        assert got[1] == pytest.approx(expected[1], rel=1e-10)
        assert got[2] == expected[2] == 2 * 2 * 7


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["plain", "masks", "kdim", "unbatched"])
def test_multihead_attention_equals_its_own_attention_weights(batch_first, variant):
    torch.manual_seed(0)
    kdim = 6 if variant == "kdim" else None
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).double()
    with torch.no_grad():
        mha.in_proj_weight.mul_(3) if mha.in_proj_weight is not None else mha.q_proj_weight.mul_(3)
    model = nn.Sequential(mha)
    g = torch.Generator().manual_seed(4)
    if variant == "unbatched":  # (L, E) whatever batch_first says; L == E would expose a transposition
        query = key = torch.randn(8, 8, generator=g, dtype=torch.float64)
    else:
        shape = (3, 5, 8) if batch_first else (5, 3, 8)
        query = torch.randn(shape, generator=g, dtype=torch.float64)
        key = torch.randn((*shape[:-1], kdim or 8), generator=g, dtype=torch.float64)
    kwargs: dict = {"need_weights": True, "average_attn_weights": False}
    if variant == "masks":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[1, 3:] = True
        kwargs["key_padding_mask"] = padding
    reference, weights = mha(query, key, key, **kwargs)
    with capture_attention(model) as capture:
        out, _ = mha(query, key, key, **kwargs)
    assert torch.equal(out, reference)
    logits = attention_logits(mha, query, key)  # float64, tested against the same weights in test_logits
    weights = weights.reshape(logits.shape)
    torch.testing.assert_close(
        torch.softmax(logits.masked_fill(weights == 0, -math.inf), -1), weights, rtol=1e-10, atol=1e-12
    )
    allowed = weights > 0
    expected = hand_statistics(logits, allowed)
    got = captured(capture, "0")
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    assert got[1] == pytest.approx(expected[1], rel=1e-10)
    assert got[2] == expected[2]


def test_capture_is_bitwise_non_interfering_outputs_grads_and_rng():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.mha = nn.MultiheadAttention(16, 2, dropout=0.2, batch_first=True)
            self.head = nn.Linear(16, 7)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True).transpose(1, 2).reshape(b, t, 16)
            h, _ = self.mha(h, h, h, need_weights=False)
            return self.head(F.dropout(h, 0.1))

    def run(capture: bool):
        torch.manual_seed(0)
        net = Net()
        x = torch.randn(3, 6, 16)
        if capture:
            with capture_attention(net) as c:
                loss = net(x).square().mean()
                loss.backward()
            assert sorted(c.sums) == ["mha", "root"]
        else:
            loss = net(x).square().mean()
            loss.backward()
        return loss.detach(), [p.grad for p in net.parameters()], torch.get_rng_state()

    plain, watched = run(False), run(True)
    assert torch.equal(plain[0], watched[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1], strict=True))
    assert torch.equal(plain[2], watched[2])
    assert not torch.overrides._get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_pre_hooks and not nn.modules.module._global_forward_hooks


def test_stop_refuses_to_pop_a_mode_entered_after_it():
    capture = AttentionCapture({}).start()
    other = AttentionCapture({})
    with other, pytest.raises(RuntimeError, match="another TorchFunctionMode"):
        capture.stop()
    assert capture.active  # nothing was torn down: it can still be stopped in order
    capture.stop()
    assert not torch.overrides._get_current_function_mode_stack()


def test_attention_sums_skip_fully_masked_rows_and_count_non_finite_allowed_logits():
    logits = torch.tensor([[[[1.0, 2.0, math.inf], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    allowed = torch.tensor([[[[True, True, False], [False, False, False]]]])
    maximum, entropy, rows, non_finite = attention_sums(logits, allowed)
    p = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    assert (float(maximum), int(rows), int(non_finite)) == (2.0, 1, 0)
    assert float(entropy) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-14)
    allowed[..., 0, 2] = True
    assert int(attention_sums(logits, allowed)[3]) == 1


def test_looks_like_attention_names_attention_modules():
    model = nn.ModuleDict({"attn": SdpaBlock(), "mha": nn.MultiheadAttention(4, 1), "mlp": nn.Linear(2, 2)})

    class CausalSelfAttention(nn.Module):
        pass

    model["block"] = CausalSelfAttention()
    assert looks_like_attention(model) == ["mha", "block"]
    assert looks_like_attention(nn.Linear(2, 2)) == []
