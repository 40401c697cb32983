"""Run by tests/callbacks/test_logits_ddp.py: LogitMonitor on two CPU processes over gloo."""

import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import LogitMonitor
from tests.callbacks.test_logits import TinyLM
from tests.helpers.ddp import DumpMeasurement, ddp_trainer


def main(out: Path) -> None:
    pl.seed_everything(3)
    monitor = LogitMonitor(every_n_steps=100, num_probe_batches=2, alignment=["head"])
    ddp_trainer(out, [DumpMeasurement(out, monitor), monitor], max_steps=2, precision="64-true").fit(TinyLM())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
