"""Small LightningModules and Trainer helpers for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ClassifierModule(pl.LightningModule):
    """MLP (optionally with BatchNorm and dropout) on a fixed synthetic classification set."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        dropout: float = 0.2,
        batchnorm: bool = True,
        num_samples: int = 64,
        batch_size: int = 8,
        hidden: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(5, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 3)]
        self.net = nn.Sequential(*layers)
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(num_samples, 5, generator=g)
        self.y = torch.randint(0, 3, (num_samples,), generator=g)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.hparams.batch_size, shuffle=True)


def loss_of(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def make_trainer(tmp_path, callbacks=(), max_steps=20, logger=False, **kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)
