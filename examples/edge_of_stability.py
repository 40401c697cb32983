"""Edge of stability in miniature: full-batch gradient descent on scikit-learn's digits.

Cohen et al. (2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability", ICLR) observed
that under full-batch gradient descent with step size ``lr`` the sharpness (top Hessian eigenvalue) first rises
("progressive sharpening") until it reaches ``2 / lr``, then hovers at that value while the loss keeps decreasing
non-monotonically. This script trains a tanh MLP with mean-squared error on one-hot digits (their setting) and
checks both phases itself from HessianMonitor's logged values:

1. progressive sharpening: the first measurement is well below ``2 / lr`` and the sharpness later reaches it;
2. the sharpness then settles near ``2 / lr`` (median of the last third within 20 %), instead of growing on.

    python examples/edge_of_stability.py        # ~1-2 minutes on 2 CPU cores; logs in ./runs/edge_of_stability
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl
import torch
from _data import FAST, digits_tensors, loader
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_landscape import HessianMonitor


class FullBatchRegressor(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        x, y, _, _ = digits_tensors()
        self.x, self.y = x, nn.functional.one_hot(y, 10).float()

    def training_step(self, batch, batch_idx):
        x, target = batch
        loss = 0.5 * (self.net(x) - target).pow(2).sum(1).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return loader(self.x, self.y, batch_size=len(self.x), shuffle=False)  # full batch: gradient descent


class SharpnessHistory(pl.Callback):
    def __init__(self, monitor: HessianMonitor) -> None:
        self.monitor, self.values = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor._last_measured_step == trainer.global_step - 1:
            self.values.append(self.monitor.last_metrics["landscape/sharpness"])
            if len(self.values) % 10 == 1:
                print(
                    f"step {trainer.global_step - 1:5d}  sharpness {self.values[-1]:7.3f}  "
                    f"eos_ratio {self.monitor.last_metrics.get('landscape/hessian/eos_ratio', float('nan')):.3f}"
                )


def main(root: str, lr: float, steps: int, every: int) -> list[float]:
    pl.seed_everything(0)
    alerts = []
    monitor = HessianMonitor(every_n_steps=every, num_probe_batches=1, on_alert=alerts.append)
    history = SharpnessHistory(monitor)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name="edge_of_stability"),
        callbacks=[monitor, history],
        enable_checkpointing=False,
        enable_progress_bar=False,  # one "epoch" per step under full-batch GD: the history line below says more
        log_every_n_steps=10,
    )
    trainer.fit(FullBatchRegressor(lr))
    limit = 2.0 / lr
    values = history.values
    late = statistics.median(values[-max(3, len(values) // 3) :])
    print(
        f"2/lr = {limit:.2f}; sharpness: first {values[0]:.2f}, max {max(values):.2f}, late median {late:.2f} "
        f"({late / limit:.2f} x 2/lr); edge_of_stability alerts: {len(alerts)}"
    )
    assert values[0] < 0.5 * limit, "expected the run to start well below 2/lr (progressive sharpening)"
    assert max(values) > 0.9 * limit, "the sharpness never reached 2/lr"
    assert 0.8 * limit < late < 1.2 * limit, "the sharpness did not settle near 2/lr"
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=1200 if FAST else 2500)
    parser.add_argument("--every", type=int, default=10 if FAST else 20)
    args = parser.parse_args()
    main(args.root, args.lr, args.steps, args.every)
