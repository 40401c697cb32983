"""Run by tests/callbacks/test_base_ddp.py: a measurement fails on rank 1 only; nobody may wait, both go on."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import EffectiveRankMonitor, HessianMonitor
from tests.helpers.ddp import ddp_trainer
from tests.helpers.lightning import ClassifierModule, loss_of

FAIL_STEP = 2


class Record(pl.Callback):
    """Every rank's status per measured step, and the weights at the end."""

    def __init__(self, out: Path, monitors) -> None:
        self.out, self.monitors, self.seen = out, monitors, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for monitor in self.monitors:
            status = monitor.last_metrics.get(monitor.key("status"))
            if status is not None and monitor._last_measured_step == trainer.global_step - 1:
                self.seen.setdefault(monitor.group, {})[str(monitor._last_measured_step)] = status

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"status_rank{rank}.json").write_text(json.dumps({"steps": trainer.global_step, **self.seen}))
        torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.out / f"weights_rank{rank}.pt")


def flaky(module, batch):
    # rank 1 fails inside the Hessian's loss (after the operator's first all-reduce, before the matvec's)
    trainer = module.trainer
    if trainer.global_rank == 1 and trainer.global_step == FAIL_STEP:
        raise RuntimeError("rank 1 fails inside measure")
    return loss_of(module, batch)


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0)
    hessian = HessianMonitor(every_n_steps=2, num_probe_batches=1, top_k=1, max_iter=4, tol=1e-1, loss_fn=flaky)
    # rank 1 fails before the rank monitor's only all-reduce, rank 0 reaches it
    rank = EffectiveRankMonitor(every_n_steps=2, num_probe_batches=1, weights=False, loss_fn=flaky)
    ddp_trainer(out, [hessian, rank, Record(out, [hessian, rank])], max_steps=6).fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
