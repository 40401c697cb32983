"""Run by tests/callbacks/test_rank_ddp.py: EffectiveRankMonitor on two CPU processes over gloo."""

import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import EffectiveRankMonitor
from tests.helpers.ddp import DumpMeasurement, ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0).double()
    model.x = model.x.double()
    monitor = EffectiveRankMonitor(every_n_steps=100, num_probe_batches=2, loss_fn=loss_of)
    ddp_trainer(out, [DumpMeasurement(out, monitor), monitor], max_steps=2, precision="64-true").fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
