"""Run by tests/callbacks/test_logits_ddp.py: LogitMonitor on two CPU processes over gloo."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import LogitMonitor
from tests.callbacks.test_logits import TinyLM
from tests.helpers.ddp import DumpMeasurement, ddp_trainer


class DumpBatch(pl.Callback):
    """Each rank's training batch at the measured step: the forward the measurement reads."""

    def __init__(self, out: Path, step: int = 1) -> None:
        self.out, self.step = out, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            torch.save(batch, self.out / f"batch_rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(3)
    # two probe batches: the measurement due at step 0 waits for the probe set and reads step 1's forward
    monitor = LogitMonitor(every_n_steps=100, num_probe_batches=2, alignment=["head"])
    callbacks = [DumpMeasurement(out, monitor), DumpBatch(out), monitor]
    ddp_trainer(out, callbacks, max_steps=2, precision="64-true").fit(TinyLM(dropout=0.0))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
