"""HessianMonitor's update_top_fraction, Hessian-axes surface and HESD criteria, through real Trainer runs."""

import copy
import importlib.util
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianMonitor, LandscapeMonitor, LandscapeWarning
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.interpolation import probe_set_totals, recompute_batchnorm
from lightning_landscape.core.surface import hesd_criteria
from tests.helpers.ddp import load_dumps, run_ddp_script
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer

N = 6


def _spectrum():
    """A fixed SPD matrix with eigenvalues 6, 3, 1, 0.5, 0.2, 0.1 and its eigenvectors (columns, ascending)."""
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    values = torch.tensor([0.1, 0.2, 0.5, 1.0, 3.0, 6.0], dtype=torch.float64)
    return q @ torch.diag(values) @ q.T, values, q


class Quadratic(pl.LightningModule):
    """Loss 0.5 theta^T A theta whatever the batch (the batch only sets the size weights)."""

    def __init__(self, theta0, lr=0.05):
        super().__init__()
        a, _, _ = _spectrum()
        self.register_buffer("a", a)
        self.theta = nn.Parameter(theta0.clone())
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return 0.5 * self.theta @ self.a @ self.theta + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1, dtype=torch.float64)), batch_size=8)


class Recorder(pl.Callback):
    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[trainer.global_step] = pl_module.theta.detach().clone()


def _quadratic_run(tmp_path, theta0, max_steps=7, trainer_kwargs=None, **monitor_kwargs):
    recorder = Recorder()
    kwargs = {"top_k": 2, "every_n_steps": 100, "num_probe_batches": 1, "tol": 1e-12, "update_top_fraction": True}
    kwargs.update(monitor_kwargs)
    monitor = HessianMonitor(**kwargs)
    model = Quadratic(theta0)
    trainer_kwargs = trainer_kwargs or {}
    make_trainer(tmp_path, [recorder, monitor], max_steps=max_steps, precision="64-true", **trainer_kwargs).fit(model)
    return monitor, recorder, model


# ------------------------------------------------------------------------------------------ update_top_fraction
def test_update_inside_the_top_eigenspace_is_one(tmp_path):
    _, _, q = _spectrum()
    # theta in span(v1, v2): the gradient A theta, so every SGD update, stays in it
    monitor, _, _ = _quadratic_run(tmp_path, 0.7 * q[:, -1] - 1.3 * q[:, -2])
    fractions = list(monitor._views.update_fractions)
    assert [s for s, _ in fractions] == [1, 2, 3, 4, 5, 6, 7]  # every logging step after the measurement at 0
    assert all(f == pytest.approx(1.0, abs=1e-9) for _, f in fractions)


def test_update_orthogonal_to_the_top_eigenspace_is_zero(tmp_path):
    _, _, q = _spectrum()
    monitor, _, _ = _quadratic_run(tmp_path, q[:, 0] + 2.0 * q[:, 2])
    fractions = [f for _, f in monitor._views.update_fractions]
    assert len(fractions) == 7
    assert all(f == pytest.approx(0.0, abs=1e-9) for f in fractions)


def test_update_fraction_equals_float64_hand_value(tmp_path):
    _, _, q = _spectrum()
    theta0 = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)
    monitor, recorder, model = _quadratic_run(tmp_path, theta0, trainer_kwargs={"log_every_n_steps": 3})
    states = {**recorder.states, 7: model.theta.detach().clone()}
    logged = dict(monitor._views.update_fractions)
    assert sorted(logged) == [3, 6]  # Lightning's logging steps only (log_every_n_steps=3)
    top = q[:, -2:]
    for step, value in logged.items():
        d = states[step] - states[step - 1]
        expected = float((top.T @ d).square().sum() / d.square().sum())
        assert 0.05 < expected < 0.999
        assert value == pytest.approx(expected, rel=1e-9)
    assert monitor.last_metrics["landscape/hessian/update_top_fraction"] == logged[6]


def test_update_fraction_is_off_by_default_and_waits_for_a_measurement(tmp_path):
    theta0 = torch.ones(N, dtype=torch.float64)
    monitor, _, _ = _quadratic_run(tmp_path, theta0, update_top_fraction=False)
    assert not monitor._views.update_fractions
    assert "landscape/hessian/update_top_fraction" not in monitor.last_metrics
    later, _, _ = _quadratic_run(tmp_path, theta0, start_step=4)
    assert [s for s, _ in later._views.update_fractions] == [5, 6, 7]


def test_update_fraction_with_gradient_accumulation_and_lambda_min(tmp_path):
    _, _, q = _spectrum()
    theta0 = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)
    recorder = Recorder()
    monitor = HessianMonitor(
        top_k=2, every_n_steps=100, num_probe_batches=1, tol=1e-12, update_top_fraction=True, lambda_min=True
    )
    model = Quadratic(theta0)
    make_trainer(tmp_path, [recorder, monitor], max_steps=3, precision="64-true", accumulate_grad_batches=2).fit(model)
    assert monitor._warm["top"].shape[0] == 3  # two top vectors and the bottom one
    states = {**recorder.states, 3: model.theta.detach().clone()}
    logged = dict(monitor._views.update_fractions)
    assert sorted(logged) == [1, 2, 3]
    top = q[:, -2:]  # the bottom vector appended for lambda_min is not part of the span
    for step, value in logged.items():
        d = states[step] - states[step - 1]
        assert value == pytest.approx(float((top.T @ d).square().sum() / d.square().sum()), rel=1e-9)


def test_update_fraction_skips_a_step_whose_parameters_changed_shape(tmp_path):
    theta0 = torch.ones(N, dtype=torch.float64)

    class Grow(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # after the last step, before the monitor reads it (listed before it)
                pl_module.theta.data = torch.ones(N + 1, dtype=torch.float64)

    monitor = HessianMonitor(top_k=2, every_n_steps=100, num_probe_batches=1, update_top_fraction=True)
    with pytest.warns(LandscapeWarning, match="update_top_fraction skipped"):
        make_trainer(tmp_path, [Grow(), monitor], max_steps=4, precision="64-true").fit(Quadratic(theta0))
    assert [s for s, _ in monitor._views.update_fractions] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------- surface
def test_surface_on_a_quadratic_matches_the_eigenvalues(tmp_path):
    _, values, _ = _spectrum()
    theta0 = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)
    logger = TensorBoardLogger(tmp_path, name="tb")
    recorder = Recorder()
    monitor = HessianMonitor(top_k=2, every_n_steps=3, num_probe_batches=1, tol=1e-12, surface=True, surface_every=2)
    model = Quadratic(theta0)
    make_trainer(tmp_path, [recorder, monitor], max_steps=7, precision="64-true", logger=logger).fit(model)
    m = monitor.last_metrics  # measurements at 0, 3, 6: surfaces at 0 and 6
    assert m["landscape/hessian/surface_curvature_v1"] == pytest.approx(float(values[-1]), rel=1e-8)
    assert m["landscape/hessian/surface_curvature_v2"] == pytest.approx(float(values[-2]), rel=1e-8)
    theta = recorder.states[6]
    a, _, _ = _spectrum()
    loss = float(0.5 * theta @ a @ theta)
    assert m["landscape/hessian/surface_loss"] == pytest.approx(loss, rel=1e-14)
    assert monitor._views.last_surface.centre == m["landscape/hessian/surface_loss"]
    # default radius: where the quadratic model along v1 doubles the loss
    assert m["landscape/hessian/surface_radius"] == pytest.approx((2 * loss / float(values[-1])) ** 0.5, rel=1e-8)
    assert m["landscape/hessian/surface_evaluations"] == 9 * 9 + 1
    assert "landscape/hessian/surface_hvps" not in m  # top_k >= 2: the measurement's own vectors
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0}).Reload()
    images = events.Images("landscape/hessian/surface")
    assert [e.step for e in images] == [0, 6]
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


def test_bundle_with_default_top_k_computes_two_directions(tmp_path):
    _, values, _ = _spectrum()
    theta0 = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)
    monitor = LandscapeMonitor(
        hessian={"surface": True, "tol": 1e-12, "surface_grid": 5, "surface_radius": 0.5, "every_n_steps": 4},
        grad_spikes=False,
        rank=False,
        connectivity=False,
        logits=False,
        num_probe_batches=1,
        max_overhead=None,
    )
    make_trainer(tmp_path, [monitor], max_steps=2, precision="64-true").fit(Quadratic(theta0))
    m = monitor.parts["hessian"].last_metrics
    assert "landscape/hessian/eig_2" not in m  # top_k stays 1 for the measurement
    assert m["landscape/hessian/surface_hvps"] > 0
    assert m["landscape/hessian/surface_curvature_v1"] == pytest.approx(float(values[-1]), rel=1e-8)
    assert m["landscape/hessian/surface_curvature_v2"] == pytest.approx(float(values[-2]), rel=1e-8)
    assert m["landscape/hessian/surface_radius"] == 0.5
    assert m["landscape/hessian/surface_evaluations"] == 25


def test_non_finite_surface_is_a_failed_measurement(tmp_path):
    theta0 = torch.ones(N, dtype=torch.float64)
    monitor = HessianMonitor(
        top_k=2, every_n_steps=4, num_probe_batches=1, surface=True, surface_radius=1e200, surface_grid=3, strict=True
    )
    with pytest.raises(FloatingPointError, match="Hessian-axes surface is not finite"):
        make_trainer(tmp_path, [monitor], max_steps=2, precision="64-true").fit(Quadratic(theta0))


def _bn_model():
    torch.manual_seed(0)
    model = ClassifierModule(dropout=0.0, batchnorm=True).double()
    model.x = model.x.double()
    return model


@pytest.mark.parametrize("policy", ["recompute", "keep"])
def test_batchnorm_surface_centre_is_the_probe_loss_under_the_policy(tmp_path, policy):
    model = _bn_model()
    recorder = StateRecorder()
    monitor = HessianMonitor(
        top_k=2,
        every_n_steps=4,
        num_probe_batches=2,
        loss_fn=loss_of,
        surface=True,
        surface_every=1,
        surface_grid=3,
        surface_bn_policy=policy,
        tol=1e-8,
    )
    make_trainer(tmp_path, [recorder, monitor], max_steps=5, precision="64-true").fit(model)
    losses = {}
    for how in ("recompute", "keep"):
        reference = copy.deepcopy(model)
        reference.load_state_dict(recorder.states[4])
        if how == "recompute":
            recompute_batchnorm(reference, monitor._probe, loss_of)
        with operator_mode(reference, "eval"):
            totals = probe_set_totals(reference, loss_of, monitor._probe)
        losses[how] = float(totals[0] / totals[2])
    assert abs(losses["recompute"] - losses["keep"]) > 1e-4  # the running statistics are not the probe set's
    assert monitor.last_metrics["landscape/hessian/surface_loss"] == pytest.approx(losses[policy], rel=1e-12)


class StateRecorder(pl.Callback):
    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def test_hesd_criteria_are_logged_from_the_measured_density(tmp_path):
    model = _bn_model()
    captured = []
    monitor = HessianMonitor(every_n_steps=3, num_probe_batches=2, loss_fn=loss_of, density=True, density_runs=2)
    original = monitor._views.after_measure

    def spy(mon, trainer, pl_module, batches, step, metrics):
        captured.append(mon._views.density)
        return original(mon, trainer, pl_module, batches, step, metrics)

    monitor._views.after_measure = spy
    make_trainer(tmp_path, [monitor], max_steps=4, precision="64-true").fit(model)
    spectrum = captured[-1]
    assert spectrum.nodes.shape[0] == 2
    re_value, khn = hesd_criteria(spectrum.nodes, spectrum.weights, 0.5)
    assert monitor.last_metrics["landscape/hessian/hesd_re"] == re_value
    assert monitor.last_metrics["landscape/hessian/hesd_khn"] == khn
    assert monitor._views.density is None  # not kept past the measurement


# --------------------------------------------------------------------------------------- non-interference
def _seeded_run(tmp_path, callbacks, optimizer):
    pl.seed_everything(7, workers=True)
    model = ClassifierModule(optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, momentum=0.5)
    trainer = make_trainer(tmp_path, callbacks, max_steps=40, log_every_n_steps=3)
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
    monitor = HessianMonitor(
        top_k=1,
        mode=mode,
        every_n_steps=10,
        density=True,
        update_top_fraction=True,
        surface=True,
        surface_every=1,
        surface_grid=3,
        raw_sharpness_every=2,
    )
    monitored = _seeded_run(tmp_path, [monitor], optimizer)
    assert monitor._views.last_surface is not None and len(monitor._views.update_fractions) >= 10
    weights, opt_state, cpu_rng, py_rng, np_rng = baseline
    weights2, opt_state2, cpu_rng2, py_rng2, np_rng2 = monitored
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    for pid, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_state2["state"][pid][name]))
    assert torch.equal(cpu_rng, cpu_rng2)
    assert py_rng == py_rng2
    assert np.array_equal(np_rng, np_rng2)


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update_top_fraction": 1}, TypeError, "`update_top_fraction` must be a bool"),
        ({"surface": "yes"}, TypeError, "`surface` must be a bool"),
        ({"surface_every": 0}, ValueError, "`surface_every` must be an int >= 1"),
        ({"surface_grid": 1}, ValueError, "`surface_grid` must be an int >= 3"),
        ({"surface_grid": 6}, ValueError, "`surface_grid` must be odd"),
        ({"surface_radius": -1.0}, ValueError, "`surface_radius` must be > 0.0"),
        ({"surface_bn_policy": "interpolate"}, ValueError, "`surface_bn_policy` must be one of"),
    ],
)
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        HessianMonitor(**kwargs)


def test_surface_without_matplotlib_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match=r"surface=True.*pip install matplotlib"):
        HessianMonitor(surface=True)
    HessianMonitor(update_top_fraction=True)  # matplotlib is only needed for the surface


# -------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_ddp_surface_equals_single_process_on_union(tmp_path):
    """The parameters are replicated, so update_top_fraction needs no collective (both ranks compute the same); the
    surface all-reduces each point's loss sums and the recomputed BatchNorm statistics."""
    run_ddp_script("ddp_hessian_surface_script.py", tmp_path)
    metrics, union, weights = load_dumps(tmp_path)  # asserts both ranks logged the same numbers
    m = metrics[0]
    assert 0.0 <= m["landscape/hessian/update_top_fraction"] <= 1.0
    model = ClassifierModule(dropout=0.0, batchnorm=True).double()
    model.load_state_dict(weights)
    recompute_batchnorm(model, union, loss_of)
    with operator_mode(model, "eval"):
        totals = probe_set_totals(model, loss_of, union)
    assert m["landscape/hessian/surface_loss"] == pytest.approx(float(totals[0] / totals[2]), rel=1e-10)


def test_surface_cadence_survives_a_checkpoint_round_trip():
    monitor = HessianMonitor(num_probe_batches=1, top_k=2, surface=True, surface_every=3)
    monitor._views._surfaces, monitor._views._surface_due = 4, True
    other = HessianMonitor(num_probe_batches=1, top_k=2, surface=True, surface_every=3)
    other.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert (other._views._surfaces, other._views._surface_due) == (4, True)
    old = copy.deepcopy(monitor.state_dict())
    del old["monitor"]["surface"]  # a checkpoint from before the surface: its cadence restarts
    fresh = HessianMonitor(num_probe_batches=1, top_k=2, surface=True, surface_every=3)
    fresh.load_state_dict(old)
    assert (fresh._views._surfaces, fresh._views._surface_due) == (0, False)
