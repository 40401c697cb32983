"""GradientSpikeMonitor's ``grad/nlm_alignment``: cos(-g, theta) over the monitored parameters (Prieto et al.)."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_landscape import GradientSpikeMonitor
from tests.helpers.lightning import ClassifierModule, make_trainer

KEY = "landscape/grad/nlm_alignment"


def spy_logged(monitor):
    logged = {}
    original = monitor.log_metrics

    def log_metrics(trainer, metrics, step):
        logged.setdefault(step, {}).update(metrics)
        original(trainer, metrics, step)

    monitor.log_metrics = log_metrics
    return logged


class DenseTwin(pl.Callback):
    """Independent reference: concatenates every gradient and its parameter in float64 and takes the cosine."""

    def __init__(self):
        self.values = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pairs = [(p.grad, p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad = torch.cat([g.detach().double().reshape(-1) for g, _ in pairs])
        theta = torch.cat([p.detach().double().reshape(-1) for _, p in pairs])
        self.values[trainer.global_step] = float(-(grad @ theta) / (grad.norm() * theta.norm()))


class Float64Net(ClassifierModule):
    """A float64 MLP with one frozen layer (no gradient, so outside the monitored set) and one unused parameter."""

    def __init__(self):
        super().__init__(batchnorm=False, dropout=0.0, optimizer="adam", lr=0.01)
        self.double()
        self.x = self.x.double()
        self.net[0].bias.requires_grad_(False)
        self.unused = nn.Parameter(torch.full((3,), 7.0, dtype=torch.float64))  # no gradient: not in the cosine


def test_nlm_alignment_is_the_dense_float64_cosine(tmp_path):
    pl.seed_everything(0)
    twin = DenseTwin()
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=2, every_n_steps=2)
    logged = spy_logged(monitor)
    make_trainer(tmp_path, [twin, monitor], max_steps=12).fit(Float64Net())
    steps = [s for s, m in logged.items() if KEY in m]
    assert steps == [1, 3, 5, 7, 9, 11]  # Lightning's logging steps: (step + 1) % 2 == 0
    for step in steps:
        assert logged[step][KEY] == pytest.approx(twin.values[step], rel=1e-12, abs=1e-14), step
    assert len({round(logged[s][KEY], 6) for s in steps}) > 1  # a real, changing number, not a constant


class Radial(pl.LightningModule):
    """``loss = sign * c * ||theta||^2 / 2``: the gradient is ``sign * c * theta`` exactly, so ``cos(-g, theta)`` is
    ``-sign``: 1 for ``sign = -1`` (the gradient points along ``-theta``: the step grows the weights along themselves,
    pure naive loss minimisation) and -1 for ``sign = +1`` (weight decay alone)."""

    def __init__(self, sign):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
        self.sign = sign

    def training_step(self, batch, batch_idx):
        squares = sum((p * p).sum() for p in self.parameters())
        return self.sign * 0.3 * squares / 2 + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.zeros(8, 1, dtype=torch.float64))
        return torch.utils.data.DataLoader(data, batch_size=2)


@pytest.mark.parametrize(("sign", "expected"), [(-1.0, 1.0), (1.0, -1.0)])
def test_nlm_alignment_is_one_along_minus_theta_and_minus_one_against(tmp_path, sign, expected):
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=2, watch_loss=False)
    logged = spy_logged(monitor)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(Radial(sign))
    values = [m[KEY] for m in logged.values()]
    assert len(values) == 6
    assert all(abs(v - expected) < 1e-14 for v in values), values


def test_nlm_alignment_per_optimizer_under_manual_optimization(tmp_path):
    from tests.helpers.real_models import TinyGAN

    class Twin(pl.Callback):
        def __init__(self):
            self.values = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad = torch.cat([p.grad.double().reshape(-1) for p in params])
            theta = torch.cat([p.detach().double().reshape(-1) for p in params])
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self.values[(step, trainer.optimizers.index(optimizer))] = float(
                -(grad @ theta) / (grad.norm() * theta.norm())
            )

    twin = Twin()
    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=5, watch_loss=False)
    logged = spy_logged(monitor)
    make_trainer(tmp_path, [twin, monitor], max_steps=24, log_every_n_steps=4).fit(TinyGAN())
    steps = [s for s, m in logged.items() if KEY in m]
    assert steps == [3, 7, 11]
    for step in steps:
        assert logged[step][KEY] == pytest.approx(twin.values[(step, 0)], rel=1e-5)
        other = logged[step]["landscape/grad/optimizer_1/nlm_alignment"]
        assert other == pytest.approx(twin.values[(step, 1)], rel=1e-5)
        assert other != pytest.approx(logged[step][KEY], rel=1e-3)  # its own parameters, not the generator's


def test_nlm_alignment_on_the_deferred_path_equals_the_host_path(tmp_path):
    def run(defer):
        pl.seed_everything(0)
        monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=2, every_n_steps=3)
        monitor._defer = defer  # read back as on an accelerator: the terms wait on the device for the flush
        logged = spy_logged(monitor)
        make_trainer(tmp_path, [monitor], max_steps=12).fit(ClassifierModule(batchnorm=False, dropout=0.0))
        return {s: m[KEY] for s, m in logged.items() if KEY in m}

    host, deferred = run(False), run(True)
    assert sorted(host) == [2, 5, 8, 11]
    assert deferred == host  # the same float64 arithmetic, read back later


def _fp16_plugins():
    from lightning.pytorch.plugins import MixedPrecision

    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2**40))]


def test_nlm_alignment_is_absent_at_overflow_steps_and_finite_elsewhere(tmp_path):
    from tests.helpers.real_models import TinyMLP

    monitor = GradientSpikeMonitor(on_alert="ignore", warmup_steps=5)
    logged = spy_logged(monitor)
    make_trainer(tmp_path, [monitor], max_steps=60, plugins=_fp16_plugins()).fit(TinyMLP())
    assert monitor.overflow_count > 5
    with_norm = {s for s, m in logged.items() if "landscape/grad/norm" in m}
    with_nlm = {s for s, m in logged.items() if KEY in m}
    assert with_nlm == with_norm and len(with_nlm) == 60 - monitor.overflow_count
    assert all(-1.0 <= logged[s][KEY] <= 1.0 for s in with_nlm)


def test_nlm_alignment_is_nan_for_a_nan_gradient_and_zero_for_a_zero_one():
    from lightning_landscape.callbacks._grad_read import _alignment

    assert math.isnan(_alignment((math.nan, 1.0), math.nan))
    assert math.isnan(_alignment((1.0, 1.0), math.inf))
    assert _alignment((0.0, 4.0), 0.0) == 0.0
    assert _alignment((-6.0, 4.0), 3.0) == 1.0  # -(-6) / (3 * 2)


# Sharded strategies: the shards' terms are reduced with the gradient squares
# (tests/callbacks/test_sharded.py::test_sharded_nlm_alignment_equals_the_unsharded_value).


def test_nlm_alignment_leaves_training_bitwise_unchanged(tmp_path):
    def run(callbacks):
        pl.seed_everything(5)
        model = ClassifierModule(optimizer="adam", lr=0.01)
        make_trainer(tmp_path, callbacks, max_steps=40).fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    monitor = GradientSpikeMonitor(warmup_steps=5, every_n_steps=1)
    (plain, rng), (watched, rng2) = run([]), run([monitor])
    assert KEY in monitor.last_metrics  # computed at every step of this run
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(rng, rng2)
