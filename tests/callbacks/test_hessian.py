import copy
import math
import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import Alert, HessianMonitor, LandscapeWarning
from lightning_landscape.callbacks._base import LandscapeAlertError
from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian
from lightning_landscape.core.stability import adam_preconditioner
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer


class StateRecorder(pl.Callback):
    """Snapshots the weights in on_train_batch_start (listed before the monitor, so it sees what the monitor sees)."""

    def __init__(self):
        self.states = {}
        self.optimizer_states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))
        self.optimizer_states.setdefault(trainer.global_step, copy.deepcopy(trainer.optimizers[0].state_dict()))


def _dense_top(module, state, batches, mode, k=5):
    module = copy.deepcopy(module)
    module.load_state_dict(state)
    with operator_mode(module, mode):
        hessian = dense_hessian(module, loss_of, batches)
    return dense_eigvalsh(hessian)


# --------------------------------------------------------------------------------------------------- twin test
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logged_eigenvalues_equal_dense_reference_and_tensorboard(tmp_path, mode):
    torch.manual_seed(0)
    model = ClassifierModule(dropout=0.3).double()
    model.x, model.y = model.x.double(), model.y
    recorder = StateRecorder()
    monitor = HessianMonitor(
        top_k=3,
        mode=mode,
        every_n_steps=5,
        num_probe_batches=2,
        loss_fn=loss_of,
        tol=1e-10,
        trace=True,
        trace_matvecs=30,
        density=True,
        per_block=True,
        lambda_min=True,
    )
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=11, logger=logger, precision="64-true")
    trainer.fit(model)

    eigenvalues = _dense_top(model, recorder.states[10], monitor._probe, mode)
    logged = monitor.last_metrics
    for i in range(3):
        assert logged[f"landscape/hessian/eig_{i + 1}"] == pytest.approx(float(eigenvalues[i]), rel=1e-6)
    assert logged["landscape/sharpness"] == logged["landscape/hessian/eig_1"]
    assert logged["landscape/hessian/lambda_min"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6, abs=1e-9)
    assert logged["landscape/hessian/converged"] == 1.0
    assert logged["landscape/hessian/hvps"] > 0
    final = copy.deepcopy(model)
    final.load_state_dict(recorder.states[10])
    head = {k: v for k, v in final.named_parameters() if k.startswith("net.4.")}
    with operator_mode(final, mode):
        block_top = dense_eigvalsh(dense_hessian(final, loss_of, monitor._probe, params=head))[0]
    assert logged["landscape/hessian/block/net.4/eig_1"] == pytest.approx(float(block_top), rel=1e-6)
    # SGD without momentum: eos_ratio = sharpness / (2 / lr)
    assert logged["landscape/hessian/eos_ratio"] == pytest.approx(logged["landscape/sharpness"] * 0.05 / 2)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    sharp = events.Scalars("landscape/sharpness")
    assert [e.step for e in sharp] == [1, 5, 10]  # due at 0, run once the 2-batch probe set was complete
    assert sharp[-1].value == pytest.approx(logged["landscape/sharpness"], rel=1e-6)
    tags = events.Tags()
    for key in (
        "landscape/hessian/trace",
        "landscape/hessian/eig_3",
        "landscape/hessian/block/net.0/eig_1",
        "landscape/hessian/block/net.4/eig_1",
    ):
        assert key in tags["scalars"]
    assert "landscape/hessian/density" in tags["histograms"]
    assert any("hessian/definition" in t for t in tags["tensors"])


def test_twin_with_parameter_subset(tmp_path):
    model = ClassifierModule(batchnorm=False, dropout=0.0).double()
    model.x = model.x.double()
    recorder = StateRecorder()
    monitor = HessianMonitor(
        top_k=2, params=["net.0"], every_n_steps=3, num_probe_batches=1, loss_fn=loss_of, tol=1e-10
    )
    make_trainer(tmp_path, [recorder, monitor], max_steps=4, precision="64-true").fit(model)
    m = copy.deepcopy(model)
    m.load_state_dict(recorder.states[3])
    params = {k: v for k, v in m.named_parameters() if k.startswith("net.0")}
    with operator_mode(m, "eval"):
        expected = dense_eigvalsh(dense_hessian(m, loss_of, monitor._probe, params=params))
    assert monitor.last_metrics["landscape/sharpness"] == pytest.approx(float(expected[0]), rel=1e-6)


def test_adam_preconditioned_sharpness_equals_dense(tmp_path):
    model = ClassifierModule(optimizer="adam", lr=0.01, batchnorm=False, dropout=0.0).double()
    model.x = model.x.double()
    recorder = StateRecorder()
    monitor = HessianMonitor(every_n_steps=3, num_probe_batches=1, loss_fn=loss_of, tol=1e-10)
    make_trainer(tmp_path, [recorder, monitor], max_steps=7, precision="64-true").fit(model)
    m = copy.deepcopy(model)
    m.load_state_dict(recorder.states[6])
    optimizer = torch.optim.Adam(m.parameters(), lr=0.01)
    optimizer.load_state_dict(recorder.optimizer_states[6])
    scale = adam_preconditioner(optimizer, dict(m.named_parameters())).rsqrt()
    with operator_mode(m, "eval"):
        hessian = dense_hessian(m, loss_of, monitor._probe)
    expected = float(dense_eigvalsh(scale[:, None] * hessian * scale[None, :])[0])
    logged = monitor.last_metrics
    assert logged["landscape/hessian/preconditioned_sharpness"] == pytest.approx(expected, rel=1e-6)
    # Adam's bias factor 1 - beta1^(t+1) at t = 6 steps taken (the threshold was 38/lr before it was modelled)
    threshold = (2 + 2 * 0.9) * (1 - 0.9**7) / ((1 - 0.9) * 0.01)
    assert logged["landscape/hessian/stability_threshold"] == pytest.approx(threshold)
    assert logged["landscape/hessian/eos_ratio"] == pytest.approx(expected / threshold, rel=1e-6)


def test_low_precision_parameters_warn_about_matvec_noise(tmp_path):
    model = ClassifierModule(batchnorm=False, dropout=0.0).to(torch.bfloat16)
    model.x = model.x.to(torch.bfloat16)
    monitor = HessianMonitor(every_n_steps=2, num_probe_batches=1, loss_fn=loss_of)
    with pytest.warns(LandscapeWarning, match="bfloat16.*noise"):
        make_trainer(tmp_path, [monitor], max_steps=1, precision="bf16-true").fit(model)
    assert math.isfinite(monitor.last_metrics["landscape/sharpness"])


# ----------------------------------------------------------------------------------------- non-interference
def _seeded_run(tmp_path, callbacks, optimizer, mode_steps=200):
    pl.seed_everything(7, workers=True)
    model = ClassifierModule(optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, momentum=0.5)
    trainer = make_trainer(tmp_path, callbacks, max_steps=mode_steps)
    trainer.fit(model)
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(trainer.optimizers[0].state_dict()),
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),
    )


@pytest.mark.parametrize(("mode", "optimizer"), [("eval", "sgd"), ("train", "adam")])
def test_training_is_bitwise_unchanged(tmp_path, mode, optimizer):
    baseline = _seeded_run(tmp_path, [], optimizer)
    monitor = HessianMonitor(top_k=2, mode=mode, every_n_steps=10, trace=True, density=True, per_block=True)
    monitored = _seeded_run(tmp_path, [monitor], optimizer)
    assert monitor.last_metrics["landscape/hessian/status"] == 1.0  # it really measured
    weights, opt_state, cpu_rng, py_rng, np_rng = baseline
    weights2, opt_state2, cpu_rng2, py_rng2, np_rng2 = monitored
    assert weights.keys() == weights2.keys()
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    for pid, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_state2["state"][pid][name]))
    assert torch.equal(cpu_rng, cpu_rng2)
    assert py_rng == py_rng2
    assert np.array_equal(np_rng, np_rng2)


def test_no_graph_or_grad_left_behind(tmp_path):
    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]

    monitor = HessianMonitor(num_probe_batches=1, every_n_steps=1, backend="graph", loss_fn=loss_of)

    class After(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for before, p in zip(check.grads, pl_module.parameters(), strict=False):
                assert (before is None and p.grad is None) or torch.equal(before, p.grad)
            assert all(p.grad is None or p.grad.grad_fn is None for p in pl_module.parameters())

    check = Check()
    model = ClassifierModule()
    make_trainer(tmp_path, [check, monitor, After()], max_steps=3, accumulate_grad_batches=2).fit(model)
    assert monitor._last_measured_step == 2


# ---------------------------------------------------------------------------------------------- resume/state
def record_warm_start(monitor):
    """Make ``monitor`` remember the warm-start vectors each measurement starts from (same class, same state_key)."""
    original = monitor.measure

    def measure(trainer, pl_module, batches, step):
        monitor.seen_warm = {k: v.clone() for k, v in monitor._warm.items()}
        return original(trainer, pl_module, batches, step)

    monitor.measure = measure
    return monitor


def test_resume_keeps_probe_set_and_warm_start(tmp_path):
    model = ClassifierModule()
    monitor = HessianMonitor(top_k=2, every_n_steps=4, num_probe_batches=2, eos_patience=3)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][monitor.state_key]
    assert len(saved["probe_by_rank"][0]) == 2

    resumed = record_warm_start(HessianMonitor(top_k=2, every_n_steps=4, num_probe_batches=2, eos_patience=3))
    make_trainer(tmp_path, [resumed], max_steps=9).fit(ClassifierModule(), ckpt_path=path)
    for old, new in zip(monitor._probe, resumed._probe, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    assert resumed._last_measured_step == 8  # no re-measurement at the resume step, next one on schedule
    # the first measurement after the resume started from the checkpoint's eigenvectors, not from scratch
    assert torch.equal(resumed.seen_warm["top"], monitor._warm["top"])
    assert resumed.growth_rule.previous is not None


def test_state_dict_round_trip_is_primitives_and_tensors():
    monitor = HessianMonitor(num_probe_batches=1, top_k=2)
    monitor._warm = {"top": torch.randn(2, 5)}
    monitor.growth_rule.update(3.0)
    monitor.alerts.append(Alert(1, "sharpness_growth", "HessianMonitor", "k", 1.0, 0.5, "m"))
    state = monitor.state_dict()
    other = HessianMonitor(num_probe_batches=1, top_k=2)
    other.load_state_dict(copy.deepcopy(state))
    assert torch.equal(other._warm["top"], monitor._warm["top"])
    assert other.growth_rule.previous == 3.0
    assert other.alerts == monitor.alerts
    torch.save(state, "/dev/null")


# --------------------------------------------------------------------------------------------------- alerts
def test_edge_of_stability_alert_goes_to_callable_and_is_logged(tmp_path):
    received = []
    monitor = HessianMonitor(
        num_probe_batches=1,
        every_n_steps=1,
        eos_threshold=1e-6,
        eos_patience=2,
        on_alert=[received.append, "ignore"],
        loss_fn=loss_of,
    )
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [monitor], max_steps=4, logger=logger).fit(ClassifierModule())
    kinds = [a.kind for a in received]
    assert kinds.count("edge_of_stability") == 1
    alert = next(a for a in received if a.kind == "edge_of_stability")
    assert alert.step == 1
    assert alert.metric == "landscape/hessian/eos_ratio"
    assert alert.value > alert.threshold
    assert monitor.alert_counts["edge_of_stability"] == 1


def test_raise_and_stop_actions(tmp_path):
    monitor = HessianMonitor(num_probe_batches=1, every_n_steps=1, eos_threshold=1e-6, eos_patience=1, on_alert="raise")
    with pytest.raises(LandscapeAlertError, match="eos_ratio") as info:
        make_trainer(tmp_path, [monitor], max_steps=3).fit(ClassifierModule())
    assert info.value.alert.kind == "edge_of_stability"

    stopper = HessianMonitor(num_probe_batches=1, every_n_steps=1, eos_threshold=1e-6, eos_patience=1, on_alert="stop")
    trainer = make_trainer(tmp_path, [stopper], max_steps=50)
    trainer.fit(ClassifierModule())
    assert trainer.global_step < 5


def test_sharpness_growth_alert(tmp_path):
    received = []
    monitor = HessianMonitor(
        num_probe_batches=1,
        every_n_steps=1,
        sharpness_jump=1e-9,
        on_alert=received.append,
        eos_threshold=1e9,
        growth_min_eos_ratio=0.0,
    )
    make_trainer(tmp_path, [monitor], max_steps=6).fit(ClassifierModule(lr=0.5))
    assert any(a.kind == "sharpness_growth" for a in received)
    # the same jumps far below the stability threshold (eos_ratio ~ 0.01 here) are not alerts by default
    quiet = HessianMonitor(num_probe_batches=1, every_n_steps=1, sharpness_jump=1e-9, on_alert="raise")
    make_trainer(tmp_path, [quiet], max_steps=6).fit(ClassifierModule(lr=0.5))
    assert quiet.last_metrics["landscape/hessian/eos_ratio"] < 0.5
    assert not quiet.alerts


# ------------------------------------------------------------------------------------------- failures/input
def test_nan_loss_logs_status_warns_once_and_training_continues(tmp_path):
    calls = {"n": 0}

    def flaky_loss(module, batch):
        calls["n"] += 1
        return loss_of(module, batch) * float("nan")

    monitor = HessianMonitor(num_probe_batches=1, every_n_steps=2, loss_fn=flaky_loss)
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    with pytest.warns(LandscapeWarning, match="failed") as record:
        trainer.fit(ClassifierModule())
    assert sum("failed" in str(w.message) for w in record) == 1
    assert trainer.global_step == 6
    assert monitor.last_metrics.keys() == {"landscape/hessian/status", "landscape/hessian/seconds"}
    assert monitor.last_metrics["landscape/hessian/status"] == 0.0

    strict = HessianMonitor(num_probe_batches=1, every_n_steps=2, loss_fn=flaky_loss, strict=True)
    with pytest.raises(FloatingPointError, match="not finite"):
        make_trainer(tmp_path, [strict], max_steps=3).fit(ClassifierModule())


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (lambda m, b: 1.0, "`loss_fn` must return a scalar Tensor.*float"),
        (lambda m, b: torch.ones(3), "`loss_fn` must return a scalar Tensor.*shape"),
    ],
)
def test_bad_loss_fn_output(tmp_path, loss_fn, match):
    with pytest.raises(TypeError, match=match):
        make_trainer(tmp_path, [HessianMonitor(num_probe_batches=1, loss_fn=loss_fn)], max_steps=1).fit(
            ClassifierModule()
        )


def test_training_step_without_loss_key(tmp_path):
    class DictModule(ClassifierModule):
        def training_step(self, batch, batch_idx):
            return {"not_loss": super().training_step(batch, batch_idx)}

    with pytest.raises(TypeError, match="`loss_fn` is None.*without a 'loss' key"):
        make_trainer(tmp_path, [HessianMonitor(num_probe_batches=1)], max_steps=1).fit(DictModule())


def test_training_step_fallback_does_not_log(tmp_path):
    logged = []

    class Spy(ClassifierModule):
        def log(self, name, value, *args, **kwargs):
            logged.append(name)
            super().log(name, value, *args, **kwargs)

    monitor = HessianMonitor(num_probe_batches=1, every_n_steps=1)
    make_trainer(tmp_path, [monitor], max_steps=3).fit(Spy())
    assert logged.count("train_loss") == 3  # only the three real training steps
    assert True


def test_manual_optimization_requires_loss_fn(tmp_path):
    class Manual(ClassifierModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = loss_of(self, batch)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="`loss_fn` must be given when the LightningModule uses manual"):
        make_trainer(tmp_path, [HessianMonitor(num_probe_batches=1)], max_steps=1).fit(Manual())


def test_no_logger_warns_once_and_keeps_values(tmp_path):
    monitor = HessianMonitor(num_probe_batches=1, every_n_steps=1)
    with pytest.warns(LandscapeWarning, match="no logger") as record:
        make_trainer(tmp_path, [monitor], max_steps=3).fit(ClassifierModule())
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert math.isfinite(monitor.last_metrics["landscape/sharpness"])


def test_probe_set_completes_before_first_measurement(tmp_path):
    monitor = HessianMonitor(every_n_steps=100, num_probe_batches=3)
    make_trainer(tmp_path, [monitor], max_steps=4).fit(ClassifierModule())
    assert monitor._last_measured_step == 2  # due at 0, run once the third batch arrived


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 0}, ValueError, "`top_k` must be an int >= 1, got 0"),
        ({"top_k": 1.5}, TypeError, "`top_k` must be an int, got 1.5"),
        ({"trace": "yes"}, TypeError, "`trace` must be a bool, got 'yes'"),
        ({"mode": "test"}, ValueError, "`mode` must be one of \\('eval', 'train'\\), got 'test'"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be an int >= 1, got 0"),
        ({"start_step": -1}, ValueError, "`start_step` must be an int >= 0, got -1"),
        ({"num_probe_batches": 0}, ValueError, "`num_probe_batches` must be an int >= 1, got 0"),
        ({"loss_fn": 3}, TypeError, "`loss_fn` must be None or a callable"),
        ({"on_alert": "shout"}, ValueError, "`on_alert` must be one of .*got 'shout'"),
        ({"on_alert": []}, ValueError, "`on_alert` must name at least one action"),
        ({"prefix": "a/"}, ValueError, "`prefix` must be a non-empty string"),
        ({"strict": 1}, TypeError, "`strict` must be a bool, got 1"),
        ({"tol": 0}, ValueError, "`tol` must be > 0.0, got 0.0"),
        ({"max_iter": 0}, ValueError, "`max_iter` must be an int >= 1, got 0"),
        ({"trace_matvecs": 2}, ValueError, "`trace_matvecs` must be an int >= 3, got 2"),
        ({"density_steps": 1}, ValueError, "`density_steps` must be an int >= 2, got 1"),
        ({"backend": "jax"}, ValueError, "`backend` must be one of .*got 'jax'"),
        ({"params": 5}, TypeError, "`params` must be None, a regex string or a list of names, got 5"),
        ({"eos_patience": 0}, ValueError, "`eos_patience` must be an int >= 1, got 0"),
        ({"sharpness_jump": 0.0}, ValueError, "`sharpness_jump` must be > 0.0, got 0.0"),
        ({"top_k": 500}, ValueError, r"`top_k` must be <= `max_iter` \(100.*got 500"),
        ({"raw_sharpness_every": 0}, ValueError, "`raw_sharpness_every` must be an int >= 1, got 0"),
        ({"params": "(["}, ValueError, "`params` must be a valid regular expression, got '\\(\\['"),
        ({"growth_min_eos_ratio": -1.0}, ValueError, "`growth_min_eos_ratio` must be >= 0.0, got -1.0"),
        ({"adaptive_eos_peak": -1.0}, ValueError, "`adaptive_eos_peak` must be >= 0.0, got -1.0"),
        ({"eos_threshold": -1.0}, ValueError, "`eos_threshold` must be >= 0.0, got -1.0"),
        ({"density_runs": 0}, ValueError, "`density_runs` must be an int >= 1, got 0"),
        ({"density_bins": 1}, ValueError, "`density_bins` must be an int >= 2, got 1"),
        ({"basis_on_cpu": 1}, TypeError, "`basis_on_cpu` must be a bool, got 1"),
        ({"per_block": 1}, TypeError, "`per_block` must be a bool, got 1"),
        ({"lambda_min": 1}, TypeError, "`lambda_min` must be a bool, got 1"),
        ({"trace": 1}, TypeError, "`trace` must be a bool, got 1"),
        ({"density": 1}, TypeError, "`density` must be a bool, got 1"),
        ({"batch_size_fn": 1}, TypeError, "`batch_size_fn` must be None or a callable"),
        ({"seed": "0"}, TypeError, "`seed` must be an int, got '0'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        HessianMonitor(**kwargs)


@pytest.mark.parametrize("params", [["encoder"], "^encoder"])
def test_unknown_param_selector_fails_at_setup(tmp_path, monkeypatch, params):
    steps = []

    class Counter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(trainer.global_step)

    match = "`params` entry 'encoder' matches no" if isinstance(params, list) else "`params` must select at least"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [Counter(), HessianMonitor(num_probe_batches=1, params=params)], max_steps=1).fit(
            ClassifierModule()
        )
    assert steps == []  # raised in setup, before any training step


def test_quiet_with_logger(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LandscapeWarning)
        make_trainer(
            tmp_path, [HessianMonitor(num_probe_batches=1, every_n_steps=2)], max_steps=3, logger=CSVLogger(tmp_path)
        ).fit(ClassifierModule())


class TinyTransformer(pl.LightningModule):
    """One attention layer (PyTorch's fused attention kernels have no double backward)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 1)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 5, 8, generator=g)
        self.y = torch.randn(16, 5, 1, generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(self.layer(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8)


def test_sharpness_through_attention_matches_the_dense_reference(tmp_path):
    model = TinyTransformer().double()
    model.x, model.y = model.x.double(), model.y.double()
    recorder = StateRecorder()
    monitor = HessianMonitor(every_n_steps=3, num_probe_batches=1, tol=1e-10)
    make_trainer(tmp_path, [recorder, monitor], max_steps=4, precision="64-true").fit(model)
    assert monitor.last_metrics["landscape/hessian/status"] == 1.0
    reference = copy.deepcopy(model)
    reference.load_state_dict(recorder.states[3])

    def loss(module, batch):
        return module.training_step(batch, 0)

    with differentiable_attention(), operator_mode(reference, "eval"):
        top = dense_eigvalsh(dense_hessian(reference, loss, monitor._probe))[0]
    assert monitor.last_metrics["landscape/sharpness"] == pytest.approx(float(top), rel=1e-6)


# ------------------------------------------------------------------------ Adam: coordinates without a gradient yet
class TokenModule(pl.LightningModule):
    """Embedding bag classifier whose two batches use disjoint tokens: after step 0 the rows of batch 1's tokens
    still have Adam second moment exactly 0, while the probe set (batches 0 and 1) gives them curvature."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 3)
        self.head = nn.Linear(3, 2)
        g = torch.Generator().manual_seed(0)
        self.x = torch.cat([torch.randint(0, 4, (8, 2), generator=g), torch.randint(4, 8, (8, 2), generator=g)])
        self.y = torch.randint(0, 2, (16,), generator=g)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x).mean(1)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=False)


def test_adam_entries_without_second_moment_raise_no_false_alarm(tmp_path):
    """Issue 15: entries of v still exactly 0 were divided by eps (eos_ratio 76-88 at steps 3-4 of a transformer)."""
    model = TokenModule().double()
    recorder = StateRecorder()
    monitor = HessianMonitor(every_n_steps=1, num_probe_batches=2, loss_fn=loss_of, tol=1e-10, eos_patience=1)
    make_trainer(tmp_path, [recorder, monitor], max_steps=2, precision="64-true").fit(model)
    step = max(recorder.states)
    m = copy.deepcopy(model)
    m.load_state_dict(recorder.states[step])
    optimizer = torch.optim.Adam(m.parameters(), lr=0.01)
    optimizer.load_state_dict(recorder.optimizer_states[step])
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in m.parameters()])
    assert int((v == 0).sum()) > 0  # the case of the issue
    with operator_mode(m, "eval"):
        hessian = dense_hessian(m, loss_of, monitor._probe)
    p_hat = (v / (1 - 0.999**step)).sqrt() + 1e-8
    naive = p_hat.rsqrt()  # what was measured before: 1/sqrt(eps) on the zero entries
    threshold = 3.8 * (1 - 0.9 ** (step + 1)) / (0.1 * 0.01)
    naive_ratio = float(dense_eigvalsh(naive[:, None] * hessian * naive[None, :])[0]) / threshold
    assert naive_ratio > 10  # the false alarm, reproduced on the dense reference
    scale = torch.where(v == 0, torch.zeros_like(v), naive)
    expected = float(dense_eigvalsh(scale[:, None] * hessian * scale[None, :])[0]) / threshold
    assert monitor.last_metrics["landscape/hessian/eos_ratio"] == pytest.approx(expected, rel=1e-6)
    assert expected < 1
    assert not [a for a in monitor.alerts if a.kind == "edge_of_stability"]


def test_adam_measures_the_raw_spectrum_on_its_own_cadence(tmp_path):
    # measurement 0 (no preconditioner yet) and every third one converge the Hessian's own spectrum
    seen = HessianMonitor(every_n_steps=1, num_probe_batches=1, raw_sharpness_every=3)
    logged = []
    seen.log_metrics = lambda trainer, metrics, step: logged.append((step, dict(metrics)))
    make_trainer(tmp_path, [seen], max_steps=7).fit(ClassifierModule(optimizer="adam", lr=0.01))
    raw_steps = [step for step, metrics in logged if "landscape/sharpness" in metrics]
    precond_steps = [step for step, metrics in logged if "landscape/hessian/preconditioned_sharpness" in metrics]
    assert raw_steps == [0, 3, 6]
    assert precond_steps == [1, 2, 3, 4, 5, 6]
    assert seen._measured == 7
    # the growth rule follows the preconditioned series only: the raw value of measurement 0 is no jump origin
    assert all(a.metric == "landscape/hessian/eos_sharpness" for a in seen.alerts if a.kind == "sharpness_growth")
    assert not [a for a in seen.alerts if a.kind == "sharpness_growth" and a.step == 1]


# ------------------------------------------------------------------------------------------ torch.compile
class _UnloggedClassifier(ClassifierModule):
    def training_step(self, batch, batch_idx):  # self.log does not trace under dynamo (a compiled module is traced)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def _compiled_run(tmp_path, callbacks, how):
    pl.seed_everything(3, workers=True)
    model = _UnloggedClassifier(dropout=0.1, batchnorm=False)
    if how == "inner":
        model.net = torch.compile(model.net)
        target = model
    else:
        target = torch.compile(model)
    make_trainer(tmp_path, callbacks, max_steps=6).fit(target)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["inner", "module"])
def test_compiled_models_are_measured_and_left_bitwise_unchanged(tmp_path, how):
    """Issue 17: the first measurement raised (donated buffers: compiled backward has no double backward) and with
    dropout 0.1 the callback changed the compiled run's trajectory. Default backend, bitwise comparison."""
    monitor = HessianMonitor(every_n_steps=2, num_probe_batches=1, loss_fn=loss_of, strict=True)
    with_monitor = _compiled_run(tmp_path, [monitor], how)
    without = _compiled_run(tmp_path, [], how)
    assert monitor.last_metrics["landscape/hessian/status"] == 1.0
    assert math.isfinite(monitor.last_metrics["landscape/sharpness"])
    for key, value in without.items():
        assert torch.equal(with_monitor[key], value), key


# ------------------------------------------------------------------------------- Adam's edge-of-stability regime
class _RatioRecorder(HessianMonitor):
    """Keeps each measurement's eos_ratio by step (to show the run did near the threshold)."""

    def _check_alerts(self, trainer, metrics, step):
        self.ratios = {**getattr(self, "ratios", {}), step: metrics.get("landscape/hessian/eos_ratio")}
        super()._check_alerts(trainer, metrics, step)


def _nanogpt_alerts(tmp_path, steps, **model_kwargs):
    from tests.helpers.real_models import NanoGPT
    from tests.helpers.real_models import make_trainer as make_lm_trainer

    received = []
    monitor = _RatioRecorder(every_n_steps=10, num_probe_batches=1, on_alert=received.append, max_overhead=None)
    make_lm_trainer(tmp_path, [monitor], max_steps=steps).fit(NanoGPT(**model_kwargs))
    return [(a.step, a.kind) for a in received], monitor.ratios


def test_healthy_adamw_language_model_raises_no_curvature_alert(tmp_path):
    """issue 15: a healthy AdamW nanoGPT (lr 3e-3) reaches a preconditioned eos_ratio of 1.67 at step 20 and 1.35 at
    step 30 (from 0.18 at step 10) and then stays at 0.1-0.4; both rules fired on it (sharpness_growth at 20,
    edge_of_stability at 30). Adam trains at a ratio ~1 normally: neither may fire below ``adaptive_eos_peak``."""
    alerts, ratios = _nanogpt_alerts(tmp_path, 40)
    # the rise happened (else the test would pass on a run that never neared the threshold)
    assert ratios[10] < 0.5 and ratios[20] > 1.2 and ratios[30] > 1.0
    assert alerts == []


def test_adamw_past_its_threshold_still_alerts_early(tmp_path):
    """benchmarks/early_warning.py gpt-sdpa-high-lr: AdamW warmed up towards lr 0.6 diverges near step 210; its
    eos_ratio is 0.25, 3.09 at steps 10-20 and above 1 at 30 (2.21 with the packages of 2026-12-01, 1.03 with
    lightning 2.6.6 / transformers 5.24 on 2026-12-02, whatever the seed), so both alerts keep their lead (growth at
    20, edge at 30)."""
    alerts, ratios = _nanogpt_alerts(
        tmp_path, 31, lr=0.6, n_embd=64, n_head=4, weight_decay=0.0, num_windows=1024, warmup_steps=400
    )
    assert ratios[20] > 2.25 and ratios[30] > 1.0
    assert alerts == [(20, "sharpness_growth"), (30, "edge_of_stability")]


def test_first_measurement_after_adams_first_step_is_preconditioned_only(tmp_path):
    # the bundle's case: the first point comes after Adam has stepped, so it is one cold Lanczos (preconditioned),
    # not two; the raw spectrum follows every `raw_sharpness_every` measurements from there
    seen = HessianMonitor(every_n_steps=1, num_probe_batches=2, raw_sharpness_every=3)
    logged = []
    seen.log_metrics = lambda trainer, metrics, step: logged.append((step, dict(metrics)))
    make_trainer(tmp_path, [seen], max_steps=8).fit(ClassifierModule(optimizer="adam", lr=0.01))
    steps = [step for step, metrics in logged if "landscape/hessian/preconditioned_sharpness" in metrics]
    raw_steps = [step for step, metrics in logged if "landscape/sharpness" in metrics]
    assert steps[0] >= 1  # measured after Adam's first step
    assert raw_steps == [steps[2], steps[5]]
    # a checkpoint from before `since_raw` resumes on the old cadence (measured % every == 0 was raw)
    fresh = HessianMonitor(raw_sharpness_every=3)
    fresh._load_monitor_state_dict({"measured": 3})
    assert fresh._since_raw + 1 >= 3
    fresh._load_monitor_state_dict({"measured": 4})
    assert fresh._since_raw + 1 < 3


def test_coupled_weight_decay_enters_the_preconditioned_operator(tmp_path):
    # Adam with coupled weight decay: the stable quantity is lambda_max(D H D + wd D^2) (core.stability, tested
    # against bisection there); here the monitor's logged value against the dense reference
    class Decayed(ClassifierModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=0.5)

    model = Decayed(batchnorm=False, dropout=0.0).double()
    model.x = model.x.double()
    recorder = StateRecorder()
    monitor = HessianMonitor(every_n_steps=3, num_probe_batches=1, loss_fn=loss_of, tol=1e-10)
    make_trainer(tmp_path, [recorder, monitor], max_steps=7, precision="64-true").fit(model)
    m = copy.deepcopy(model)
    m.load_state_dict(recorder.states[6])
    optimizer = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.5)
    optimizer.load_state_dict(recorder.optimizer_states[6])
    d = adam_preconditioner(optimizer, dict(m.named_parameters())).rsqrt()
    with operator_mode(m, "eval"):
        hessian = dense_hessian(m, loss_of, monitor._probe)
    expected = float(dense_eigvalsh(d[:, None] * hessian * d[None, :] + torch.diag(0.5 * d.square()))[0])
    logged = monitor.last_metrics["landscape/hessian/preconditioned_sharpness"]
    assert logged == pytest.approx(expected, rel=1e-6)
    without = float(dense_eigvalsh(d[:, None] * hessian * d[None, :])[0])
    assert abs(without / expected - 1) > 1e-3  # the decay's term is visible at this tolerance
