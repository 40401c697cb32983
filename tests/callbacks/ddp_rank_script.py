"""Run by tests/callbacks/test_rank_ddp.py: EffectiveRankMonitor on two CPU processes over gloo."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import EffectiveRankMonitor
from tests.helpers.lightning import ClassifierModule, loss_of


class Dump(pl.Callback):
    def __init__(self, out: Path, monitor: EffectiveRankMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1 and trainer.global_rank == 0:  # the measurement runs at step 1
            torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.out / "weights.pt")

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"metrics_rank{rank}.json").write_text(json.dumps(self.monitor.last_metrics))
        torch.save(self.monitor._probe, self.out / f"probe_rank{rank}.pt")


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = ClassifierModule(dropout=0.0).double()
    model.x = model.x.double()
    monitor = EffectiveRankMonitor(every_n_steps=100, num_probe_batches=2, loss_fn=loss_of)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Dump(out, monitor), monitor],
        default_root_dir=str(out),
    )
    trainer.fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
