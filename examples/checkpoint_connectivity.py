"""Offline linear-mode connectivity between the checkpoints of a real run, with the ``lightning-landscape`` command.

Trains an MLP on scikit-learn's digits with a ModelCheckpoint every 25 steps, then runs

    lightning-landscape lmc runs/checkpoint_connectivity/checkpoints \\
        --module checkpoint_connectivity:DigitsClassifier --datamodule checkpoint_connectivity:DigitsData --pairs all

which writes the chord-barrier matrix as ``barriers.csv`` and a TensorBoard heatmap next to it, and checks the
matrix: zero diagonal, symmetric, finite, non-negative. In this healthy run every pair of checkpoints is linearly
connected (the loss along each segment stays under the chord, so every chord barrier is 0), which the script also
checks; ``examples/instability_analysis.py`` shows the opposite case.

    python examples/checkpoint_connectivity.py        # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from _data import FAST, digits_tensors, loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_landscape.cli import main as landscape_cli


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.x, self.y, _, _ = digits_tensors()

    def train_dataloader(self):
        return loader(self.x, self.y, batch_size=self.batch_size, shuffle=True)


def main(root: str, steps: int) -> list[list[float]]:
    pl.seed_everything(0)
    folder = Path(root) / "checkpoint_connectivity"
    saver = ModelCheckpoint(dirpath=folder / "checkpoints", every_n_train_steps=25, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[saver], logger=False, enable_progress_bar=False)
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    landscape_cli(
        [
            "lmc",
            str(folder / "checkpoints"),
            "--module",
            "checkpoint_connectivity:DigitsClassifier",
            "--datamodule",
            "checkpoint_connectivity:DigitsData",
            "--pairs",
            "all",
            "--num-alphas",
            "7" if FAST else "11",
            "--out",
            str(folder / "lmc"),
        ]
    )
    rows = list(csv.reader((folder / "lmc" / "barriers.csv").open()))
    names, matrix = rows[0][1:], [[float(v) for v in row[1:]] for row in rows[1:]]
    print("chord barriers (loss) between checkpoints:")
    for name, row in zip(names, matrix, strict=True):
        print(f"  {name:>14}  " + "  ".join(f"{v:6.3f}" for v in row))
    n = len(names)
    assert n == steps // 25
    assert all(matrix[i][i] == 0.0 for i in range(n))
    assert all(matrix[i][j] == matrix[j][i] >= 0.0 and math.isfinite(matrix[i][j]) for i in range(n) for j in range(n))
    assert max(max(row) for row in matrix) < 0.01, "checkpoints of this healthy run should be linearly connected"
    return matrix


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs")
    parser.add_argument("--steps", type=int, default=100 if FAST else 200)
    args = parser.parse_args()
    main(args.root, args.steps)
