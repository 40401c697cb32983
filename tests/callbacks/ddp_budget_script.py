"""Run by tests/callbacks/test_budget_ddp.py: budget mode on two processes whose clocks disagree."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape.callbacks import _base
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


def main(out: Path) -> None:
    clock = FakeClock()
    _base.time = clock
    budget_module.time = clock
    monitor = CostlyMonitor(clock, every_n_steps=1, max_overhead=0.05)
    ddp_trainer(out, [monitor, RankTicker(clock), Dump(out, monitor)], max_steps=600).fit(ClassifierModule())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
