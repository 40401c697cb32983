"""A real case: nanoGPT on the stdlib corpus at a far too high learning rate (3.0 after an 80-step warm-up) diverges;
with GradientSpikeMonitor(on_alert="rollback") it rolls back on the loss spikes, lowers the rate, and finishes
healthy."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_landscape import GradientSpikeMonitor
from tests.helpers.real_models import NanoGPT, make_trainer

pytestmark = pytest.mark.slow  # two 160-step nanoGPT runs, ~50 s on CPU


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # the trajectories (whether and where the plain run diverges) depend on the CPU thread count: measured with 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def train(tmp_path, on_alert):
    losses = Losses()
    callbacks = [losses]
    monitor = None
    if on_alert is not None:
        monitor = GradientSpikeMonitor(on_alert=on_alert, warmup_steps=10, rollback_every_n_steps=10, max_rollbacks=5)
        callbacks.append(monitor)
    make_trainer(tmp_path, callbacks, max_steps=160).fit(NanoGPT(lr=3.0, warmup_steps=80))
    return losses.values, monitor


def test_rollback_rescues_a_diverging_nanogpt(tmp_path):
    diverged, _ = train(tmp_path / "plain", None)
    rescued, monitor = train(tmp_path / "rollback", ["rollback", "ignore"])
    tail = lambda values: sum(values[-10:]) / 10  # noqa: E731
    assert tail(diverged) > 10.0  # the plain run ends far above its starting loss (ln 128 = 4.85)
    assert 1 <= monitor.alerting.rollbacks <= 5
    assert all(math.isfinite(v) for v in rescued)
    assert tail(rescued) < 4.0  # below the starting loss: still learning
    assert max(rescued) < max(diverged) / 5
