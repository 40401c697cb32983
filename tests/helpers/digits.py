"""A real-data LightningModule (scikit-learn's digits) for behaviour tests that need realistic noise."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(n: int = 1500) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(data.target[:n], dtype=torch.long)


class DigitsModule(pl.LightningModule):
    """64-64-10 ReLU MLP, Adam 1e-3, batch 32; the loss is multiplied by 100 at ``corrupt_steps``."""

    def __init__(self, corrupt_steps: tuple[int, ...] = (), lr: float = 1e-3, batch_size: int = 32) -> None:
        super().__init__()
        self.corrupt_steps = set(corrupt_steps)
        self.lr, self.batch_size = lr, batch_size
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.x, self.y = digits()

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        return loss * 100 if self.global_step in self.corrupt_steps else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class DigitsDataModule(pl.LightningDataModule):
    """The digits as a DataModule (for the offline ``lightning-landscape lmc`` command)."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.x, self.y = digits()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)
