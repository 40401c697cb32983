"""LogitMonitor: values equal an independent twin, training untouched bitwise, alerts, state, TensorBoard."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LogitMonitor
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.logits import attention_logits, top_right_singular_vector
from tests.helpers.lightning import ClassifierModule, make_trainer


class TinyLM(pl.LightningModule):
    """One causal pre-norm transformer layer over random tokens (fast path and fused attention both in play)."""

    def __init__(self, lr: float = 1e-2, vocab: int = 11, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        g = torch.Generator().manual_seed(5)
        self.tokens = torch.randint(0, vocab, (64, 9), generator=g)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens), mask=mask, is_causal=True))

    def training_step(self, batch, batch_idx):
        (window,) = batch
        logits = self(window[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.tokens), batch_size=8, shuffle=True)


class StateRecorder(pl.Callback):
    """The weights and the training batch at the start of every step (the forward a measurement reads)."""

    def __init__(self):
        self.states = {}
        self.batches = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))
        self.batches.setdefault(trainer.global_step, copy.deepcopy(batch))


def twin_statistics(model: TinyLM, window: torch.Tensor) -> dict[str, float]:
    """Independent twin: run the layer by hand (pre-norm), read the logits and the head's input."""
    tokens = window[:, :-1]
    layer = model.blocks.layers[0]
    with operator_mode(model, "eval"), torch.no_grad():
        x = model.embed(tokens)
        h = layer.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1]).isneginf()
        logits = attention_logits(layer.self_attn, h, h)
        attention_max = float(logits.masked_fill(mask, -math.inf).max())
        out = model(tokens)
    return {"attention_max": attention_max, "log_z": float(torch.logsumexp(out.double(), -1).mean())}


def test_values_equal_a_hand_computed_twin_and_read_back_from_tensorboard(tmp_path):
    # the statistics are those of step 10's own training forward (its batch, its weights); no dropout, so the
    # twin can recompute that forward exactly
    recorder = StateRecorder()
    monitor = LogitMonitor(every_n_steps=5, alignment=True)
    logger = TensorBoardLogger(tmp_path, name="logits")
    pl.seed_everything(0)
    make_trainer(tmp_path, [recorder, monitor], max_steps=11, logger=logger).fit(TinyLM(dropout=0.0))
    model = TinyLM(dropout=0.0)
    model.load_state_dict(recorder.states[10])
    (window,) = recorder.batches[10]
    twin = twin_statistics(model, window)
    m = monitor.last_metrics
    assert m["landscape/logits/status"] == 1.0
    assert m["landscape/logits/attention/max"] == pytest.approx(twin["attention_max"], rel=1e-5)
    assert m["landscape/logits/attention/blocks.layers.0.self_attn/max"] == m["landscape/logits/attention/max"]
    assert 0 < m["landscape/logits/attention/blocks.layers.0.self_attn/entropy"] < math.log(8)
    assert m["landscape/logits/output/log_partition"] == pytest.approx(twin["log_z"], rel=1e-5)
    first = monitor._initial_log_partition
    assert m["landscape/logits/output/drift"] == pytest.approx(twin["log_z"] - first, rel=1e-4, abs=1e-6)
    # spectral alignment of the head: the sign fraction of v1 . x over the head's inputs
    v, _ = top_right_singular_vector(model.head.weight, iterations=2000, tol=1e-12)
    with operator_mode(model, "eval"), torch.no_grad():
        features = (
            model.blocks(
                model.embed(window[:, :-1]),
                mask=nn.Transformer.generate_square_subsequent_mask(8),
                is_causal=True,
            )
            .reshape(-1, 16)
            .double()
        )
    projection = features @ v
    expected = max(int((projection > 0).sum()), int((projection < 0).sum())) / int((projection != 0).sum())
    assert m["landscape/logits/alignment/head/sign_fraction"] == pytest.approx(expected, abs=2 / len(projection))
    # the out_proj inside attention is never called as a module: not watched
    assert not any("out_proj" in k for k in m)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("landscape/logits/attention/max")
    assert [e.step for e in logged] == [0, 5, 10]
    assert logged[-1].value == pytest.approx(m["landscape/logits/attention/max"], rel=1e-6)


def test_training_is_bitwise_untouched_and_no_hook_is_left(tmp_path):
    def run(callbacks):
        pl.seed_everything(7)
        model = TinyLM()
        make_trainer(tmp_path, callbacks, max_steps=12).fit(model)
        return model, torch.get_rng_state()

    plain, rng = run([])
    monitor = LogitMonitor(every_n_steps=1, mode="train", alignment=True)
    watched, rng2 = run([monitor])
    assert monitor.num_measurements == 12
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True)
    )
    assert torch.equal(rng, rng2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched.modules())


def test_attention_alert_fires_at_a_high_learning_rate_and_not_at_a_safe_one(tmp_path):
    def run(lr):
        pl.seed_everything(0)
        alerts = []
        monitor = LogitMonitor(every_n_steps=5, on_alert=alerts.append, attention_logit_threshold=10.0)
        make_trainer(tmp_path, [monitor], max_steps=60, deterministic=False).fit(TinyLM(lr=lr))
        return alerts, monitor

    safe, monitor = run(1e-3)
    assert safe == []
    assert monitor.last_metrics["landscape/logits/attention/max"] < 10.0
    hot, monitor = run(0.3)
    assert "attention_logit_growth" in [a.kind for a in hot]
    alert = next(a for a in hot if a.kind == "attention_logit_growth")
    assert alert.value > 10.0 and alert.threshold == 10.0 and "qk-layernorm" in alert.message


def test_log_partition_drift_alert_is_edge_triggered(tmp_path):
    monitor = LogitMonitor(attention=False, alignment=False, log_partition_drift=0.5)
    monitor._log_root = tmp_path  # where the JSONL alert log goes (set by `setup` in a real fit)
    alerts = []
    monitor.on_alert = [alerts.append]
    trainer = make_trainer(tmp_path)
    p = "landscape/logits/output/drift"
    for step, drift in enumerate([0.0, 0.7, 0.9, 0.1, -0.8]):
        monitor._check_alerts(trainer, {p: drift}, {}, step)
    assert [(a.step, a.kind) for a in alerts] == [(1, "logit_divergence"), (4, "logit_divergence")]


def test_classifier_without_attention_watches_the_head(tmp_path):
    monitor = LogitMonitor(every_n_steps=5)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(ClassifierModule(dropout=0.0))
    keys = set(monitor.last_metrics)
    assert "landscape/logits/output/log_partition" in keys
    assert not any("/attention/" in k for k in keys)
    assert not any("/alignment/" in k for k in keys)  # alignment is opt-in


def test_the_capture_is_not_armed_again_on_a_model_without_attention(tmp_path):
    class Armed(pl.Callback):  # after the monitor's on_train_batch_start: what it armed for this step
        def __init__(self, monitor):
            self.monitor, self.captures = monitor, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            armed = self.monitor._armed
            if armed is not None:
                self.captures.append(armed.capture is not None)

    monitor = LogitMonitor(every_n_steps=2)
    armed = Armed(monitor)
    make_trainer(tmp_path, [monitor, armed], max_steps=7).fit(ClassifierModule(dropout=0.0))
    # the first armed step looks for attention calls, finds none (and no attention-like module): no capture after
    assert armed.captures == [True, False, False, False]
    assert "landscape/logits/output/log_partition" in monitor.last_metrics  # the head is still read
    # a model with attention keeps its capture on every armed step
    lm_monitor = LogitMonitor(every_n_steps=2)
    lm_armed = Armed(lm_monitor)
    make_trainer(tmp_path, [lm_monitor, lm_armed], max_steps=7).fit(TinyLM(dropout=0.0))
    assert lm_armed.captures == [True, True, True, True]
    assert any("/attention/" in k for k in lm_monitor.last_metrics)


class SometimesMixing(pl.LightningModule):
    """No module that looks like attention, but a forward that calls scaled_dot_product_attention while
    ``mixing`` is on (as a model whose attention runs only on some steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.mixing = True
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 5, 4, generator=g), torch.randint(0, 3, (64,), generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x).unsqueeze(1)  # (batch, 1 head, 5 tokens, 8)
        if self.mixing:
            h = nn.functional.scaled_dot_product_attention(h, h, h)
        return nn.functional.cross_entropy(self.head(h.mean(dim=(1, 2))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def test_only_the_first_armed_step_decides_that_the_model_has_no_attention(tmp_path):
    class StopMixing(pl.Callback):  # after the first armed step, the forward calls no attention kernel any more
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.mixing = False

    class Armed(pl.Callback):
        def __init__(self, monitor):
            self.monitor, self.captures = monitor, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.monitor._armed is not None:
                self.captures.append(self.monitor._armed.capture is not None)

    monitor = LogitMonitor(every_n_steps=2)
    armed = Armed(monitor)
    make_trainer(tmp_path, [monitor, armed, StopMixing()], max_steps=7).fit(SometimesMixing())
    # the first armed step captured attention: a later step without any does not switch the capture off
    assert armed.captures == [True, True, True, True]
    assert not monitor._attention_absent


def test_state_round_trip(tmp_path):
    monitor = LogitMonitor(every_n_steps=5, alignment=True)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(TinyLM())
    state = monitor.state_dict()
    fresh = LogitMonitor(every_n_steps=5, alignment=True)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh._initial_log_partition == monitor._initial_log_partition
    assert fresh._directions.keys() == monitor._directions.keys()
    assert all(torch.equal(fresh._directions[k], v) for k, v in monitor._directions.items())
    assert fresh._alert_armed == monitor._alert_armed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attention": 3}, TypeError, "`attention`"),
        ({"alignment": "("}, ValueError, "`alignment`"),
        ({"output_module": 1}, TypeError, "`output_module`"),
        ({"log_partition_drift": 0}, ValueError, "`log_partition_drift`"),
        ({"alignment_threshold": 0.2}, ValueError, "`alignment_threshold`"),
        ({"attention_logit_threshold": math.nan}, ValueError, "`attention_logit_threshold`"),
        ({"softmax_collapse_fraction": 1.0}, ValueError, "`softmax_collapse_fraction`"),
        ({"entropy_samples": 0}, ValueError, "`entropy_samples`"),
        ({"attention_growth_factor": 0.5}, ValueError, "`attention_growth_factor` must be >= 1.0"),
        ({"attention_growth_factor": "2"}, TypeError, "`attention_growth_factor`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LogitMonitor(**kwargs)


def test_unknown_output_module_fails_clearly(tmp_path):
    monitor = LogitMonitor(output_module="nope", strict=True)
    with pytest.raises(ValueError, match="`output_module` must name a module"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule())


class Saturating(pl.LightningModule):
    """An identity head over fixed logits: rows i % 4 == 0 saturate (a gap of 40), the others do not (gap 2 or 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 5, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(5))
        gaps = torch.tensor([40.0 if i % 4 == 0 else (2.0 if i % 2 else 12.0) for i in range(32)])
        self.logits = torch.zeros(32, 5)
        self.logits[:, 1] = gaps

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out = self.head(x)
        return nn.functional.cross_entropy(out, out.argmax(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.logits), batch_size=8)


def test_softmax_collapse_equals_a_float32_hand_count_and_alerts_above_its_fraction(tmp_path):
    model = Saturating()
    hand = float((torch.softmax(model.logits[:8].float(), -1).amax(-1) == 1).float().mean())
    assert hand == 0.25  # exactly the rows built to saturate
    alerts = []
    monitor = LogitMonitor(every_n_steps=1, on_alert=alerts.append, softmax_collapse_fraction=0.2)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(model)
    assert monitor.last_metrics["landscape/logits/output/softmax_collapse"] == hand
    assert [(a.step, a.kind) for a in alerts] == [(0, "softmax_collapse")]  # edge-triggered: once
    assert alerts[0].value == hand and alerts[0].threshold == 0.2
    quiet = []
    make_trainer(tmp_path, [LogitMonitor(on_alert=quiet.append, softmax_collapse_fraction=0.3)], max_steps=1).fit(
        Saturating()
    )
    assert quiet == []
