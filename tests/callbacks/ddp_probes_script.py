"""Run by tests/callbacks/test_probes_ddp.py: LandscapeMonitor's shared probe set under 2-process DDP, then a resume
from its checkpoint; every rank dumps what it holds."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import LandscapeMonitor
from tests.helpers.ddp import ddp_trainer
from tests.helpers.lightning import ClassifierModule

FAST = {"hessian": {"every_n_steps": 3}, "rank": {"every_n_steps": 3}, "connectivity": False, "logits": False}


class Dump(pl.Callback):
    def __init__(self, out: Path, monitor: LandscapeMonitor, name: str) -> None:
        self.out, self.monitor, self.name = out, monitor, name

    def on_train_end(self, trainer, pl_module):
        probes = self.monitor.probes
        rank = trainer.global_rank
        record = {
            "mine": [b[0] for b in probes.batches],
            "by_rank": [[b[0] for b in slice_] for slice_ in probes.by_rank],
            "one_copy": probes.by_rank[rank] is probes.batches,
            "hessian_reads_shared": self.monitor.parts["hessian"]._probe[0][0] is probes.batches[0][0],
        }
        torch.save(record, self.out / f"{self.name}_rank{rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(3)
    monitor = LandscapeMonitor(**FAST, grad_spikes=False, max_overhead=None)
    trainer = ddp_trainer(out, [monitor, Dump(out, monitor, "first")], max_steps=5)
    trainer.fit(ClassifierModule(dropout=0.0))
    trainer.save_checkpoint(out / "probes.ckpt")
    resumed = LandscapeMonitor(**FAST, grad_spikes=False, max_overhead=None)
    ddp_trainer(out, [resumed, Dump(out, resumed, "resumed")], max_steps=7).fit(
        ClassifierModule(dropout=0.0), ckpt_path=out / "probes.ckpt"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
