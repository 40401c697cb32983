"""Run by tests/callbacks/test_rank_ddp.py: EffectiveRankMonitor on two CPU processes over gloo, where only rank 0's
data reaches the `branch` module (the ranks record different module sets)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import EffectiveRankMonitor
from tests.helpers.ddp import DumpMeasurement, ddp_trainer


class Branchy(pl.LightningModule):
    """``trunk -> [branch, on rank 0 only] -> head``: rank 1 never runs ``branch`` (as a rank whose data never
    takes a branch of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(32, 5, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (32,), generator=g)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        if self.global_rank == 0:
            h = torch.tanh(self.branch(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, shuffle=False)


def loss_of(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def main(out: Path) -> None:
    pl.seed_everything(3)
    model = Branchy().double()
    monitor = EffectiveRankMonitor(
        modules=["trunk", "branch", "head"], weights=False, every_n_steps=100, num_probe_batches=2, loss_fn=loss_of
    )
    trainer = ddp_trainer(
        out,
        [DumpMeasurement(out, monitor), monitor],
        max_steps=2,
        precision="64-true",
        strategy="ddp_find_unused_parameters_true",  # rank 1 never uses `branch`
    )
    trainer.fit(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
