"""Run by tests/callbacks/test_hessian_ddp.py: HessianMonitor on two CPU processes over gloo."""

import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import HessianMonitor
from tests.helpers.ddp import DumpMeasurement, ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of


def main(out: Path, mode: str) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0).double()
    model.x = model.x.double()
    monitor = HessianMonitor(top_k=3, mode=mode, every_n_steps=100, num_probe_batches=2, loss_fn=loss_of, tol=1e-10)
    ddp_trainer(out, [DumpMeasurement(out, monitor), monitor], max_steps=2, precision="64-true").fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
