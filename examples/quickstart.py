"""Quickstart: an MLP on scikit-learn's digits with LandscapeMonitor (every monitor); TensorBoard logs in ./runs.

    python examples/quickstart.py            # ~1 minute on 2 CPU cores
    tensorboard --logdir runs                # then open the "landscape" section

The script checks its own result: the model learns (validation accuracy > 90 %), every Hessian measurement
converged, the logged sharpness is finite and positive, and a healthy run raises no alert.
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import torch
from _data import FAST, digits_tensors, loader
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_landscape import LandscapeMonitor


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10)
        )
        self.x_train, self.y_train, self.x_val, self.y_val = digits_tensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return loader(self.x_train, self.y_train, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return loader(self.x_val, self.y_val, batch_size=297, shuffle=False)


def main(root: str = "runs", epochs: int = 12) -> dict[str, float]:
    pl.seed_everything(0)
    every = 10 if FAST else 50  # the fast mode (tests) trains 2 epochs = 48 steps
    monitor = LandscapeMonitor(
        hessian={
            "top_k": 3,
            "lambda_min": True,
            "trace": True,
            "density": True,
            "per_block": True,
            "every_n_steps": every,
        },
        rank={"every_n_steps": every},
        connectivity={"every_n_steps": every},
        # This demo measures densely to fill the dashboard: a 2 ms step makes each Hessian measurement cost ~50
        # steps. LandscapeMonitor() keeps the default 5% budget, which would space them out on a model this small.
        max_overhead=None,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(root, name="quickstart"),
        callbacks=[monitor],
        accelerator="cpu",
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    model = DigitsClassifier()
    trainer.fit(model)
    accuracy = float(trainer.callback_metrics["val/acc"])
    metrics = monitor.last_metrics
    print(
        f"validation accuracy {accuracy:.3f}; sharpness {metrics['landscape/sharpness']:.3f} "
        f"(eos_ratio {metrics['landscape/hessian/eos_ratio']:.3f}); RankMe "
        f"{metrics['landscape/rank/net.4/rankme']:.1f}; LMC barrier {metrics['landscape/lmc/barrier']:.4f}; "
        f"logs in {trainer.logger.log_dir}"
    )
    # self-checks
    assert accuracy > (0.8 if FAST else 0.9), f"the model did not learn (val acc {accuracy:.3f})"
    assert math.isfinite(metrics["landscape/sharpness"])
    assert metrics["landscape/sharpness"] > 0
    assert metrics["landscape/hessian/converged"] == 1.0
    assert metrics["landscape/rank/net.4/rankme"] > 2
    assert metrics["landscape/lmc/barrier"] >= 0
    assert not monitor.alerts, f"a healthy run raised alerts: {monitor.alerts}"
    return {"accuracy": accuracy, **metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs", help="TensorBoard log root (default: ./runs)")
    parser.add_argument("--epochs", type=int, default=2 if FAST else 12)
    args = parser.parse_args()
    main(args.root, args.epochs)
