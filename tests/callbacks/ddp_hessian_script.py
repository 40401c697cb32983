"""Run by tests/callbacks/test_hessian_ddp.py: HessianMonitor on two CPU processes over gloo."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import HessianMonitor
from lightning_landscape.callbacks import _hessian_probe
from tests.helpers.ddp import DumpMeasurement, ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of


class RankDependentAutoTarget(pl.Callback):
    """probe_fraction="auto" on a clock that would choose differently on each rank: rank 0 the whole batch, rank 1
    a quarter. Rank 0's choice must be every rank's, or the all-reduced product mixes two operators."""

    def setup(self, trainer, pl_module, stage):
        _hessian_probe.AUTO_TARGET_STEPS = 10**9 if trainer.global_rank == 0 else 0


class DumpAtMeasuredStep(DumpMeasurement):
    """DumpMeasurement at whichever step the budget let the measurement run (rank 0's weights then)."""

    def __init__(self, out: Path, monitor: HessianMonitor) -> None:
        super().__init__(out, monitor)
        self.states: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.global_rank == 0:
            torch.save(self.states[self.monitor.schedule.last_measured_step], self.out / "weights.pt")


def main(out: Path, mode: str) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0).double()
    model.x = model.x.double()
    if mode == "auto":
        model = ClassifierModule(optimizer="adam", lr=0.01, dropout=0.0).double()  # "auto" only halves under Adam
        model.x = model.x.double()
        monitor = HessianMonitor(
            raw_sharpness_every=1,
            top_k=3,
            every_n_steps=100,
            num_probe_batches=2,
            loss_fn=loss_of,
            tol=1e-10,
            probe_fraction="auto",
            max_overhead=1.0,
        )
        monitor.first_cost_steps = 0.01  # measure as soon as 10 steps are timed
        callbacks = [RankDependentAutoTarget(), DumpAtMeasuredStep(out, monitor), monitor]
        ddp_trainer(out, callbacks, max_steps=16, precision="64-true").fit(model)
        return
    monitor = HessianMonitor(top_k=3, mode=mode, every_n_steps=100, num_probe_batches=2, loss_fn=loss_of, tol=1e-10)
    ddp_trainer(out, [DumpMeasurement(out, monitor), monitor], max_steps=2, precision="64-true").fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
