"""Softmax collapse on modular addition (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability").

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/grokking.py           # 1500 steps per arm (~2-4 min each)
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/grokking.py --fast    # 800 steps per arm: collapse begins

``a + b mod 97`` from the one-hot pair, a 2-layer ReLU MLP (194 -> 256 -> 97), full-batch AdamW (lr 1e-2, betas
(0.9, 0.95)) in float32 on 40% of the 9409 pairs, the rest held out. Two arms from the same seed: **no weight
decay** (the model memorises the training pairs within ~200 steps, then scales its logits along the naive
loss-minimisation direction until float32 rounds the top softmax probability to exactly 1: softmax collapse; the
loss floors near 1e-7 and the held-out accuracy stays at chance) and the **control** with ``weight_decay=1.0``
(it groks: held-out accuracy ~1 by step ~1000, no collapse). With ``beta2=0.999`` the same run did not collapse
within 1500 steps (its loss fell only like 1/t: Adam's long second-moment memory shrinks its steps as the gradient
decays), hence 0.95.

Watched by ``LogitMonitor(attention=False, softmax_collapse_fraction=...)`` every ``--every`` steps and
``GradientSpikeMonitor()`` at its defaults (every step), alerts recorded, never acted on (monitors do not change
training). Recorded per logging step: ``{p}/logits/output/softmax_collapse``, the train loss and accuracy of that
step's forward, the held-out accuracy, and ``{p}/grad/nlm_alignment`` where the installed GradientSpikeMonitor logs
it. Prints a markdown table for ``benchmarks/RESULTS.md``: the alert step of each arm, the collapse fraction over
steps, accuracy stuck vs the control.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_landscape import GradientSpikeMonitor, LogitMonitor

COLLAPSE = "logits/output/softmax_collapse"
NLM = "grad/nlm_alignment"


# ---------------------------------------------------------------------------------------------- the task
def modular_addition(modulus: int = 97, train_fraction: float = 0.4, seed: int = 0):
    """``(x_train, y_train, x_val, y_val)``: one-hot ``[a, b]`` (``2 * modulus`` wide, float32) -> ``(a + b) % p``,
    a seeded split of all ``modulus**2`` pairs."""
    a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([nn.functional.one_hot(a, modulus), nn.functional.one_hot(b, modulus)], 1).float()
    y = (a + b) % modulus
    order = torch.randperm(modulus * modulus, generator=torch.Generator().manual_seed(seed))
    n = int(train_fraction * modulus * modulus)
    train, val = order[:n], order[n:]
    return x[train], y[train], x[val], y[val]


class ModularMLP(pl.LightningModule):
    """Full-batch AdamW on modular addition; ``weight_decay=0`` collapses, ``1.0`` groks (see the module docstring).

    Every step is one full-batch step (one epoch of ``steps`` identical batches, so no per-epoch overhead); the
    training step keeps its own accuracy in ``train_accuracy`` (no logging, no change to the run).
    """

    def __init__(
        self,
        weight_decay: float = 0.0,
        steps: int = 1500,
        modulus: int = 97,
        train_fraction: float = 0.4,
        hidden: int = 256,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.weight_decay, self.steps, self.lr, self.betas = weight_decay, steps, lr, betas
        self.x, self.y, self.x_val, self.y_val = modular_addition(modulus, train_fraction)
        self.net = nn.Sequential(nn.Linear(2 * modulus, hidden), nn.ReLU(), nn.Linear(hidden, modulus))
        self.train_accuracy = float("nan")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_accuracy = float((logits.detach().argmax(-1) == y).float().mean())
        return nn.functional.cross_entropy(logits, y)

    @torch.no_grad()
    def val_accuracy(self) -> float:
        return float((self(self.x_val).argmax(-1) == self.y_val).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def train_dataloader(self):
        return DataLoader([(self.x, self.y)] * self.steps, batch_size=None)


# --------------------------------------------------------------------------------------------- recording
class MemoryLogger(Logger):
    """Every logged scalar by step, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.setdefault(int(step or 0), {}).update({k: float(v) for k, v in metrics.items()})


class Recorder(pl.Callback):
    """Loss, train accuracy (the step's own forward) and held-out accuracy every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step whose forward just ran (LogitMonitor logs it at this step)
        if step % self.every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.rows[step] = {
                "loss": float(loss),
                "train_acc": pl_module.train_accuracy,
                "val_acc": pl_module.val_accuracy(),  # no dropout or BatchNorm: the forward changes nothing
            }


def run_arm(weight_decay: float, steps: int, every: int, threshold: float, **model_kwargs: Any) -> dict[str, Any]:
    """One seeded run; its per-step rows, alerts and wall time."""
    pl.seed_everything(0, verbose=False)
    model = ModularMLP(weight_decay, steps, **model_kwargs)
    alerts: list = []
    logger, recorder = MemoryLogger(), Recorder(every)
    monitors = [
        LogitMonitor(attention=False, every_n_steps=every, softmax_collapse_fraction=threshold, on_alert=alerts.append),
        GradientSpikeMonitor(on_alert=alerts.append),
    ]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, *monitors],
        log_every_n_steps=every,
    )
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    # the gradient monitor logs on Lightning's logging steps, which need not be the recorder's: each row takes the
    # latest nlm_alignment logged at or before its step
    nlm_steps = sorted(
        (s, v) for s, logged in logger.metrics.items() for k, v in logged.items() if k.endswith("/" + NLM)
    )
    rows = {}
    for step, row in sorted(recorder.rows.items()):
        logged = logger.metrics.get(step, {})
        row = dict(row)
        row["collapse"] = next((v for k, v in logged.items() if k.endswith(COLLAPSE)), None)
        row["nlm_alignment"] = next((v for s, v in reversed(nlm_steps) if s <= step), None)
        rows[step] = row
    first: dict[str, int] = {}
    for alert in alerts:
        first.setdefault(alert.kind, alert.step)
    return {"weight_decay": weight_decay, "rows": rows, "first_alerts": first, "seconds": seconds}


# ------------------------------------------------------------------------------------------------ report
def _f(value: float | None, digits: str = ".3f") -> str:
    return "" if value is None else format(value, digits)


def table(plain: dict[str, Any], control: dict[str, Any], stride: int) -> str:
    """Markdown: one row every ``stride`` steps, the two arms side by side."""
    has_nlm = any(r["nlm_alignment"] is not None for arm in (plain, control) for r in arm["rows"].values())
    cols = ["train loss", "train acc", "val acc", "softmax_collapse"] + (["nlm_alignment"] if has_nlm else [])
    header = ["step"] + [f"{tag}: {c}" for tag in ("no WD", f"WD {control['weight_decay']:g}") for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    steps = sorted(plain["rows"])
    shown = [s for s in steps if s % stride == 0] + ([steps[-1]] if steps and steps[-1] % stride else [])
    for step in shown:
        cells = [str(step)]
        for arm in (plain, control):
            r = arm["rows"].get(step)
            if r is None:
                cells += [""] * len(cols)
                continue
            cells += [_f(r["loss"], ".2e"), _f(r["train_acc"]), _f(r["val_acc"]), _f(r["collapse"])]
            if has_nlm:
                cells.append(_f(r["nlm_alignment"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(plain: dict[str, Any], control: dict[str, Any]) -> str:
    lines = [
        "| arm | softmax_collapse alert at step | largest collapse fraction (at step) | final val acc | best val acc "
        "| other alerts (first step) | wall s |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for tag, arm in (("no weight decay", plain), (f"weight decay {control['weight_decay']:g}", control)):
        rows = arm["rows"]
        collapse = [(r["collapse"], s) for s, r in rows.items() if r["collapse"] is not None]
        peak, at = max(collapse, default=(None, None))
        final = rows[max(rows)]["val_acc"] if rows else None
        best = max((r["val_acc"] for r in rows.values()), default=None)
        alert = arm["first_alerts"].get("softmax_collapse")
        others = ", ".join(f"{k} {v}" for k, v in arm["first_alerts"].items() if k != "softmax_collapse") or "none"
        lines.append(
            f"| {tag} | {'none' if alert is None else alert} | {_f(peak)} ({'' if at is None else at}) | "
            f"{_f(final)} | {_f(best)} | {others} | {arm['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=20, help="LogitMonitor cadence and recording stride")
    parser.add_argument("--threshold", type=float, default=0.1, help="softmax_collapse_fraction")
    parser.add_argument("--weight-decay", type=float, default=1.0, help="the control's AdamW weight decay")
    parser.add_argument("--modulus", type=int, default=97)
    parser.add_argument("--stride", type=int, default=100, help="table rows every this many steps")
    parser.add_argument("--fast", action="store_true", help="800 steps per arm: the collapse and its alert begin")
    args = parser.parse_args(argv)
    steps = min(args.steps, 800) if args.fast else args.steps
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    arms = []
    for weight_decay in (0.0, args.weight_decay):
        arms.append(run_arm(weight_decay, steps, args.every, args.threshold, modulus=args.modulus))
        print(f"weight decay {weight_decay:g}: {arms[-1]['seconds']:.0f} s, alerts {arms[-1]['first_alerts']}")
    plain, control = arms
    print(f"\n### Grokking: softmax collapse without weight decay (mod {args.modulus}, {steps} steps)\n")
    print(summary(plain, control))
    print()
    print(table(plain, control, args.stride))
    return {"plain": plain, "control": control}


if __name__ == "__main__":
    main()
