"""Run by tests/callbacks/test_hessian_surface.py: update_top_fraction and the surface on two CPU processes."""

import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import HessianMonitor
from tests.helpers.ddp import DumpMeasurement, ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0, batchnorm=True).double()
    model.x = model.x.double()
    monitor = HessianMonitor(
        top_k=2,
        every_n_steps=100,
        num_probe_batches=2,
        loss_fn=loss_of,
        tol=1e-10,
        update_top_fraction=True,
        surface=True,
        surface_grid=3,
    )
    callbacks = [DumpMeasurement(out, monitor), monitor]
    ddp_trainer(out, callbacks, max_steps=4, precision="64-true", log_every_n_steps=1).fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
