"""Run by tests/callbacks/test_budget_ddp.py: budget mode on two processes whose clocks disagree."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import GradientSpikeMonitor
from lightning_landscape.callbacks import _measure
from lightning_landscape.callbacks import grad_spikes as grad_spikes_module
from lightning_landscape.core import budget as budget_module
from tests.callbacks.test_budget import STEP_SECONDS, CostlyMonitor, FakeClock
from tests.helpers.ddp import ddp_trainer
from tests.helpers.lightning import ClassifierModule


class RankTicker(pl.Callback):
    """Rank r's steps take (1 + 2 r) x 10 ms: left alone, rank 1 would afford its first measurement 3x sooner."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, *args) -> None:
        self.clock.now += STEP_SECONDS * (1 + 2 * trainer.global_rank)


class Dump(pl.Callback):
    def __init__(self, out: Path, monitor: CostlyMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_end(self, trainer, pl_module) -> None:
        steps = [step for step, _, _ in self.monitor.measured]
        (self.out / f"steps_rank{trainer.global_rank}.json").write_text(json.dumps(steps))


class StrideLog(pl.Callback):
    """The gradient monitor's stride after every step, and its alerts, per rank."""

    def __init__(self, out: Path, monitor: GradientSpikeMonitor) -> None:
        self.out, self.monitor, self.strides = out, monitor, []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.strides.append(self.monitor.stride)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"strides": self.strides, "alerts": [(a.step, a.kind) for a in self.monitor.alerts]}
        (self.out / f"strides_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def slow_reads_on_rank_zero(monitor: GradientSpikeMonitor, clock: FakeClock) -> None:
    """On rank 0's clock reading the gradients takes 3 ms (more than 60% of 5% of its 10 ms steps); on rank 1's,
    nothing. Left alone, the ranks would pick different strides and their collectives would fall out of step."""
    original = monitor._read_gradients

    def read(trainer, pl_module):
        original(trainer, pl_module)
        if trainer.global_rank == 0 and monitor._current is not None and monitor._current[1] is not None:
            clock.now += 0.003

    monitor._read_gradients = read


def main(out: Path) -> None:
    clock = FakeClock()
    _measure.time = clock
    budget_module.time = clock
    grad_spikes_module.time = clock
    monitor = CostlyMonitor(clock, every_n_steps=1, max_overhead=0.05)
    spikes = GradientSpikeMonitor(max_overhead=0.05, every_n_steps=10, warmup_steps=20, on_alert="ignore")
    spikes.budget_share = 0.6  # as in LandscapeMonitor
    slow_reads_on_rank_zero(spikes, clock)
    callbacks = [monitor, spikes, RankTicker(clock), Dump(out, monitor), StrideLog(out, spikes)]
    ddp_trainer(out, callbacks, max_steps=600).fit(ClassifierModule())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
