"""Run by tests/callbacks/test_logits_ddp.py: LogitMonitor on two CPU processes over gloo, on a model without
attention-like modules whose forward calls scaled_dot_product_attention on rank 0 only."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import LogitMonitor
from tests.callbacks.test_logits import SometimesMixing
from tests.helpers.ddp import ddp_trainer


class DumpAbsent(pl.Callback):
    def __init__(self, out: Path, monitor: LogitMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_start(self, trainer, pl_module):
        pl_module.mixing = trainer.global_rank == 0

    def on_train_end(self, trainer, pl_module):
        keys = sorted(k for k in self.monitor.last_metrics if "/attention/" in k)
        dump = {"absent": self.monitor._attention_absent, "attention_keys": keys}
        (self.out / f"absent_rank{trainer.global_rank}.json").write_text(json.dumps(dump))


def main(out: Path) -> None:
    pl.seed_everything(3)
    monitor = LogitMonitor(every_n_steps=2)
    ddp_trainer(out, [DumpAbsent(out, monitor), monitor], max_steps=5).fit(SometimesMixing())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
