"""Run by tests/callbacks/test_grad_spikes_ddp.py: two CPU processes over gloo, loss corrupted on rank 1 only."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_landscape import GradientSpikeMonitor
from tests.helpers.ddp import ddp_trainer
from tests.helpers.digits import DigitsModule


class RankOneCorrupted(DigitsModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        # only one rank sees the bad batch: the reduced gradient and loss must still make both ranks stop together
        return loss * 100 if self.global_step == 100 and self.global_rank == 1 else loss


class NlmTwin(pl.Callback):
    """Listed after the monitor: the dense float64 cosine of the (all-reduced) gradients, and what the monitor
    logged for the same step."""

    def __init__(self, monitor: GradientSpikeMonitor) -> None:
        self.monitor, self.twin, self.logged = monitor, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        grad = torch.cat([p.grad.double().reshape(-1) for p in params])
        theta = torch.cat([p.detach().double().reshape(-1) for p in params])
        self.twin[trainer.global_step] = float(-(grad @ theta) / (grad.norm() * theta.norm()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged[trainer.global_step - 1] = self.monitor.last_metrics.get("landscape/grad/nlm_alignment")


def main(out: Path) -> None:
    pl.seed_everything(0)
    monitor = GradientSpikeMonitor(on_alert=["stop", "ignore"], every_n_steps=1)
    nlm = NlmTwin(monitor)
    trainer = ddp_trainer(out, [monitor, nlm], max_steps=300)
    trainer.fit(RankOneCorrupted())
    result = {"global_step": trainer.global_step, "alerts": [a.to_dict() for a in monitor.alerts]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    (out / f"nlm_rank{trainer.global_rank}.json").write_text(json.dumps({"twin": nlm.twin, "logged": nlm.logged}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
