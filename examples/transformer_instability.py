"""A character transformer at a too-high learning rate: the curvature alerts fire before the loss diverges.

A 2-layer character-level transformer learns the standard library's own source code with AdamW and a 50-step
linear warm-up, once at a learning rate of 0.1 (too high: the loss blows up soon after the warm-up ends) and once at
3e-3 (safe). Both runs carry the same monitors; every alert is collected with ``on_alert``:

- ``HessianMonitor`` every 10 steps on one probe batch: ``eos_ratio`` is Adam's preconditioned sharpness over its
  stability threshold ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022, "Adaptive gradient methods at the
  edge of stability"), and ``sharpness_growth`` fires when the sharpness doubles between measurements near it;
- ``GradientSpikeMonitor`` at its defaults (gradient-norm and loss z-scores, non-finite values);
- ``LogitMonitor`` at its defaults (one probe forward every 10 steps): ``attention_logit_growth`` fires when the
  largest attention logit passes 30, the attention-logit growth of Wortsman et al. 2023.

The script checks itself: at lr 0.1 the first alert comes at least 10 steps before the divergence step (the first
step whose loss exceeds 1.5x the initial loss) and the attention-logit alert comes before it too, and at lr 3e-3
there is no alert and no divergence. The same
scenario, with every signal and two baselines (ZClip, KillLossSpike), is in ``benchmarks/early_warning.py``.

Why not ``LandscapeMonitor()`` at its defaults here: its 5% time budget lets a Hessian measurement (about 100-200
training steps' worth of compute on this model) run only every few thousand steps, and its logits part, held to a
share of that budget, about every 50 steps, while this run diverges ~50 steps after the warm-up. The per-step
signals it always runs only see the blow-up when it happens (lead 0, see benchmarks/RESULTS.md). Curvature and
attention logits warn early, at the price shown here: dense cadences.

    python examples/transformer_instability.py      # ~1-2 minutes on 2 CPU cores; logs in ./runs
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _data import FAST
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from grad_spikes import CharTransformer, stdlib_text

from lightning_landscape import GradientSpikeMonitor, HessianMonitor, LogitMonitor


class CharLM(pl.LightningModule):
    def __init__(self, lr: float, steps: int, warmup: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters()
        text = stdlib_text(200_000)
        chars = sorted(set(text))
        ids = torch.tensor([chars.index(c) for c in text])
        windows = ids[: (len(ids) // 65) * 65].view(-1, 65)
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(windows[torch.randint(0, len(windows), (16 * steps,), generator=g)])
        self.net = CharTransformer(len(chars), width=64, layers=2, context=64)

    def training_step(self, batch, batch_idx):
        (window,) = batch
        logits = self.net(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / self.hparams.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=False)


class Divergence(pl.Callback):
    """The first step whose loss is non-finite or above 1.5x the initial loss; stops 10 steps later."""

    def __init__(self) -> None:
        self.initial: float | None = None
        self.step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss, step = float(outputs["loss"]), trainer.global_step - 1
        self.initial = loss if self.initial is None else self.initial
        if self.step is None and step >= 10 and (not math.isfinite(loss) or loss > 1.5 * self.initial):
            self.step = step
        if self.step is not None and step >= self.step + 10:
            trainer.should_stop = True


def run(lr: float, steps: int, root: str) -> tuple[int | None, list]:
    pl.seed_everything(0)
    alerts: list = []
    shared = {"on_alert": alerts.append}
    divergence = Divergence()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name=f"transformer_lr{lr:g}"),
        callbacks=[
            divergence,
            HessianMonitor(every_n_steps=10, num_probe_batches=1, **shared),
            GradientSpikeMonitor(**shared),
            LogitMonitor(**shared),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    trainer.fit(CharLM(lr, steps))
    return divergence.step, alerts


def main(root: str = "runs") -> None:
    steps = 70 if FAST else 150
    diverged_at, alerts = run(0.1, steps, root)
    for alert in alerts[:5]:
        print(f"  lr 0.1  step {alert.step:4d}  {alert.kind:18s} {alert.message}")
    first = min((a.step for a in alerts), default=None)
    print(f"lr 0.1: first alert at step {first}, divergence at step {diverged_at}")
    assert diverged_at is not None, "the lr 0.1 run was expected to diverge"
    assert first is not None, "no alert at lr 0.1"
    assert first <= diverged_at - 10, "the alerts must come at least 10 steps before divergence"
    logit_alert = min((a.step for a in alerts if a.kind == "attention_logit_growth"), default=None)
    print(f"lr 0.1: attention-logit alert at step {logit_alert}")
    assert logit_alert is not None, "no attention-logit alert at lr 0.1"
    assert logit_alert < diverged_at, "the attention logits must warn before divergence"

    safe_divergence, safe_alerts = run(3e-3, steps, root)
    print(f"lr 3e-3: {len(safe_alerts)} alerts, divergence {safe_divergence}")
    assert safe_divergence is None, f"the safe run diverged at step {safe_divergence}"
    assert not safe_alerts, f"the safe run raised {safe_alerts}"
    print(f"lead time {diverged_at - first} steps; logs in {root}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs", help="TensorBoard log root (default: ./runs)")
    main(parser.parse_args().root)
