"""Run by tests/callbacks/test_grad_spikes_ddp.py: two CPU processes over gloo, loss corrupted on rank 1 only."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_landscape import GradientSpikeMonitor
from tests.helpers.ddp import ddp_trainer
from tests.helpers.digits import DigitsModule


class RankOneCorrupted(DigitsModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        # only one rank sees the bad batch: the reduced gradient and loss must still make both ranks stop together
        return loss * 100 if self.global_step == 100 and self.global_rank == 1 else loss


def main(out: Path) -> None:
    pl.seed_everything(0)
    monitor = GradientSpikeMonitor(on_alert=["stop", "ignore"], every_n_steps=1)
    trainer = ddp_trainer(out, [monitor], max_steps=300)
    trainer.fit(RankOneCorrupted())
    result = {"global_step": trainer.global_step, "alerts": [a.to_dict() for a in monitor.alerts]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
