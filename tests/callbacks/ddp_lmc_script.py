"""Run by tests/callbacks/test_connectivity_ddp.py: ModeConnectivityMonitor on two CPU processes over gloo."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import ModeConnectivityMonitor
from tests.helpers.ddp import ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of


class Dump(pl.Callback):
    def __init__(self, out: Path, monitor: ModeConnectivityMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step in (2, 4):  # the two snapshots of the last measurement
            state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, self.out / f"weights_step{trainer.global_step}.pt")

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"metrics_rank{rank}.json").write_text(json.dumps(self.monitor.last_metrics))
        torch.save(self.monitor._probe, self.out / f"probe_rank{rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0, lr=2.0, momentum=0.9).double()
    model.x = model.x.double()
    monitor = ModeConnectivityMonitor(
        num_alphas=5, refine_steps=1, every_n_steps=2, num_probe_batches=2, loss_fn=loss_of, bn_policy="recompute"
    )
    ddp_trainer(out, [Dump(out, monitor), monitor], max_steps=5, precision="64-true").fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
