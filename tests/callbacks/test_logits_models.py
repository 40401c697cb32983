"""LogitMonitor on real model code (nanoGPT on sdpa, HF GPT-2 eager/sdpa, Lightning's demo transformer): attention
logits read from the training forward, equal to a hand computation, training bitwise untouched, compiled fallback."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_landscape import LogitMonitor
from lightning_landscape.core._validation import LandscapeWarning
from tests.callbacks.test_logits import StateRecorder
from tests.helpers.lightning import make_trainer
from tests.helpers.real_models import HFGPT2, DemoTransformer, NanoGPT, split_lm_batch

P = "landscape/logits"


def _fit(tmp_path, model, callbacks, max_steps=5, **kwargs):
    pl.seed_everything(0)
    make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs).fit(model)
    return model


@pytest.mark.parametrize(
    ("factory", "names"),
    [
        (lambda: NanoGPT(), ["net.h.0.attn", "net.h.1.attn"]),
        (lambda: HFGPT2("eager"), ["model.transformer.h.0.attn", "model.transformer.h.1.attn"]),
        (lambda: HFGPT2("sdpa"), ["model.transformer.h.0.attn", "model.transformer.h.1.attn"]),
        (lambda: DemoTransformer(), None),
    ],
    ids=["nanogpt", "hf-eager", "hf-sdpa", "lightning-demo"],
)
def test_every_attention_implementation_logs_attention_keys(tmp_path, factory, names):
    monitor = LogitMonitor(every_n_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*captured no attention", category=LandscapeWarning)
        warnings.filterwarnings("error", message=".*nothing to watch", category=LandscapeWarning)
        _fit(tmp_path, factory(), [monitor], max_steps=3, logger=False)
    m = monitor.last_metrics
    assert m[f"{P}/status"] == 1.0
    logged = sorted(k[len(f"{P}/attention/") : -len("/max")] for k in m if k.endswith("/max") and "/attention/" in k)
    logged.remove("") if "" in logged else None
    if names is not None:
        assert logged == names
    else:  # nn.Transformer encoder-decoder: self-attention in both stacks, cross-attention in the decoder
        assert any("encoder" in n and n.endswith("self_attn") for n in logged)
        assert any("decoder" in n and n.endswith("multihead_attn") for n in logged)
    assert m[f"{P}/attention/max"] == max(m[f"{P}/attention/{n}/max"] for n in logged)
    assert all(0 < m[f"{P}/attention/{n}/entropy"] <= math.log(32) + 1e-6 for n in logged)
    assert f"{P}/output/log_partition" in m


def test_nanogpt_values_are_those_of_the_training_forward_by_hand(tmp_path):
    recorder = StateRecorder()
    monitor = LogitMonitor(every_n_steps=3)
    _fit(tmp_path, NanoGPT(), [recorder, monitor], max_steps=4, logger=False)
    model = NanoGPT()
    model.load_state_dict(recorder.states[3])
    inputs, _, _ = split_lm_batch(recorder.batches[3])
    qk = {}
    hooks = [
        block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: qk.__setitem__(i, out.detach().double()))
        for i, block in enumerate(model.net.h)
    ]
    with torch.no_grad():
        logits = model(inputs).double()
    for hook in hooks:
        hook.remove()
    b, t = inputs.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    m = monitor.last_metrics
    for i in range(2):
        q, k, _ = qk[i].split(32, dim=-1)
        q, k = (z.view(b, t, 2, 16).transpose(1, 2) for z in (q, k))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(~causal, -math.inf)
        p = torch.softmax(scores, -1)
        # the entropy: over the first `entropy_samples` (default 2) batch rows; the maximum over all
        entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)[:2].mean()
        assert m[f"{P}/attention/net.h.{i}.attn/max"] == pytest.approx(float(scores.max()), rel=1e-5)
        assert m[f"{P}/attention/net.h.{i}.attn/entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert m[f"{P}/output/log_partition"] == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-5)
    assert m[f"{P}/output/max_abs"] == pytest.approx(float(logits.abs().max()), rel=1e-5)


@pytest.mark.parametrize(
    "factory",
    [lambda: NanoGPT(dropout=0.1), lambda: HFGPT2("eager", dropout=0.1), lambda: HFGPT2("sdpa", dropout=0.1)],
    ids=["nanogpt", "hf-eager", "hf-sdpa"],
)
def test_training_is_bitwise_untouched_with_the_capture_every_step(tmp_path, factory):
    def run(callbacks):
        model = _fit(tmp_path, factory(), callbacks, max_steps=4, logger=False)
        return model.state_dict(), torch.get_rng_state()

    plain, rng = run([])
    monitor = LogitMonitor(every_n_steps=1, alignment=True)
    watched, rng2 = run([monitor])
    assert monitor.num_measurements == 4 and f"{P}/attention/max" in monitor.last_metrics
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), watched.values(), strict=True))
    assert torch.equal(rng, rng2)
    assert not torch.overrides._get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_pre_hooks and not nn.modules.module._global_forward_hooks


class _OpaqueAttention(nn.Module):
    """Attention through a 3-D softmax over (batch * heads, L, S): invisible to the capture, as a custom kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class _OpaqueModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.attn = _OpaqueAttention()
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.head(self.attn(x)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4, 8)), batch_size=4)


def test_a_model_with_attention_but_nothing_captured_gets_one_warning(tmp_path):
    monitor = LogitMonitor(every_n_steps=1)
    with pytest.warns(LandscapeWarning, match="captured no attention call") as record:
        _fit(tmp_path, _OpaqueModel(), [monitor], max_steps=3, logger=False)
    assert sum("captured no attention call" in str(w.message) for w in record) == 1
    assert not any("/attention/" in k for k in monitor.last_metrics)
    assert f"{P}/output/log_partition" in monitor.last_metrics


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "nope"}, r"`attention`='nope' matches no module"),
        ({"attention": ["net.h.0.attn", "net.h.9.attn"]}, r"`attention`=.*names \['net.h.9.attn'\]"),
        ({"alignment": "nope"}, r"`alignment`='nope' matches no module"),
        ({"alignment": ["net.h.0.attn"]}, r"`alignment`=.*names \['net.h.0.attn'\]"),
        ({"output_module": "nope"}, r"`output_module` must name a module of the model, got 'nope'"),
    ],
)
def test_selectors_matching_nothing_fail_at_setup(tmp_path, kwargs, match):
    monitor = LogitMonitor(**kwargs)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args):
            seen.append(1)

    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, NanoGPT(), [monitor, Spy()], max_steps=2, logger=False)
    assert seen == []  # before any training step


def test_a_selected_subset_is_read_and_the_rest_passes_through(tmp_path):
    monitor = LogitMonitor(every_n_steps=2, attention=r"h\.1\.")
    _fit(tmp_path, NanoGPT(), [monitor], max_steps=3, logger=False)
    keys = [k for k in monitor.last_metrics if "/attention/" in k]
    assert sorted(keys) == [
        f"{P}/attention/max",
        f"{P}/attention/net.h.1.attn/entropy",
        f"{P}/attention/net.h.1.attn/max",
    ]


def test_compiled_model_falls_back_to_one_eager_probe_forward_without_recompiling(tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")

    def run(callbacks):
        model = NanoGPT()
        model.net = torch.compile(model.net, backend="eager")  # Dynamo traces; no inductor (fast on CPU)
        dynamo.reset()
        dynamo.utils.counters.clear()
        _fit(tmp_path, model, callbacks, max_steps=4, logger=False)
        return copy.deepcopy(model.state_dict()), dict(dynamo.utils.counters["stats"])

    plain, plain_stats = run([])
    monitor = LogitMonitor(every_n_steps=2)
    with pytest.warns(LandscapeWarning, match="model is compiled"):
        watched, stats = run([monitor])
    assert monitor.num_measurements == 2
    m = monitor.last_metrics
    assert m[f"{P}/status"] == 1.0 and f"{P}/attention/net._orig_mod.h.0.attn/max" in m
    assert stats.get("unique_graphs") == plain_stats.get("unique_graphs")  # the probe forward compiled nothing
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), watched.values(), strict=True))


def test_inside_landscape_monitor_the_bundle_forwards_the_hooks_it_needs(tmp_path):
    from lightning_landscape import LandscapeMonitor

    bundle = LandscapeMonitor(
        hessian=False,
        grad_spikes=False,
        rank=False,
        connectivity=False,
        logits={"every_n_steps": 2},
        max_overhead=None,
    )
    _fit(tmp_path, NanoGPT(), [bundle], max_steps=5, logger=False)
    part = bundle.parts["logits"]
    assert part.num_measurements == 3  # steps 0, 2, 4
    assert f"{P}/attention/net.h.0.attn/max" in bundle.last_metrics
    assert part._armed is None and not torch.overrides._get_current_function_mode_stack()


def test_gradient_accumulation_reads_the_first_micro_batch_of_the_step(tmp_path):
    recorder = StateRecorder()
    monitor = LogitMonitor(every_n_steps=2, attention=False)
    _fit(tmp_path, NanoGPT(), [recorder, monitor], max_steps=3, accumulate_grad_batches=2, logger=False)
    assert monitor.num_measurements == 2  # steps 0 and 2, once each
    model = NanoGPT()
    model.load_state_dict(recorder.states[2])
    inputs, _, _ = split_lm_batch(recorder.batches[2])  # the first micro-batch of step 2
    with torch.no_grad():
        expected = float(torch.logsumexp(model(inputs).double(), -1).mean())
    assert monitor.last_metrics[f"{P}/output/log_partition"] == pytest.approx(expected, rel=1e-5)


def test_an_error_in_the_training_step_leaves_no_capture_behind(tmp_path):
    class Failing(NanoGPT):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 2:
                raise KeyError("boom")
            return loss

    monitor = LogitMonitor(every_n_steps=2)
    with pytest.raises(KeyError, match="boom"):
        _fit(tmp_path, Failing(), [monitor], max_steps=4, logger=False)
    assert monitor._armed is None and monitor.num_measurements == 2
    assert not torch.overrides._get_current_function_mode_stack()
    assert not nn.modules.module._global_forward_pre_hooks and not nn.modules.module._global_forward_hooks


def test_a_compiled_lightning_module_is_detected_and_measured_eagerly(tmp_path):
    # trainer.fit(torch.compile(module)): Lightning unwraps it and compiles the module's forward (_compiler_ctx)
    pytest.importorskip("torch._dynamo")
    compiled = torch.compile(NanoGPT(log_loss=False), backend="eager")
    monitor = LogitMonitor(every_n_steps=2)
    with pytest.warns(LandscapeWarning, match="model is compiled"):
        _fit(tmp_path, compiled, [monitor], max_steps=3, logger=False)
    assert monitor.num_measurements == 2
    assert monitor.last_metrics[f"{P}/status"] == 1.0
    assert f"{P}/attention/net.h.1.attn/max" in monitor.last_metrics
