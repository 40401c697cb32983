"""Early warning, measured: instability scenarios with matched stable controls, lead time of every signal.

    python benchmarks/early_warning.py            # ~5-10 minutes on 2 CPU cores
    python benchmarks/early_warning.py --only transformer-high-lr

Each scenario is trained twice with the same seed: *unstable* and its *control* (the same setup at a safe
learning rate, or without the corruption). Every monitor watches both runs with ``on_alert`` recording alerts
(monitors never change training, so the trajectories are those of an unmonitored run):

- the fast signals at their defaults: ``GradientSpikeMonitor`` (``grad_spike``, ``loss_spike``, ``non_finite``,
  ``grad_growth``) and ``LogitMonitor`` (``attention_logit_growth``; ``logit_divergence`` and ``alignment_collapse``
  are off by default);
- the slow signals at a dense fixed cadence, to see what they could tell: ``HessianMonitor`` (``edge_of_stability``,
  ``sharpness_growth``), ``EffectiveRankMonitor`` (``rank_collapse``), ``ModeConnectivityMonitor`` (``barrier_rise``);
- ``LandscapeMonitor()`` exactly as a user adds it (defaults, 5% budget), in a separate run;
- two baselines computed from the same runs' per-step gradient norms and losses: ZClip's z-score rule (the
  ``zclip`` package's own statistics: EMA alpha 0.97, z > 2.5 after 25 warm-up steps) and a KillLossSpike-style loss
  rule (llm-foundry: window 100, 5 consecutive losses >= 2x the window mean).

Divergence step: the first step (after 10) whose training loss is non-finite or above 1.5x the loss at step 0. Lead time
= divergence step - first alert step (positive: the alert came first). An alert on a control is a false alarm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _data import digits_tensors
from grad_spikes import CharTransformer, stdlib_text

from lightning_landscape import (
    EffectiveRankMonitor,
    GradientSpikeMonitor,
    HessianMonitor,
    LandscapeMonitor,
    LogitMonitor,
    ModeConnectivityMonitor,
)


# ------------------------------------------------------------------------------------------------ scenarios
class CharLM(pl.LightningModule):
    """2-layer character transformer on the standard library's source; AdamW with linear warm-up."""

    def __init__(self, lr: float, steps: int, warmup: int = 50) -> None:
        super().__init__()
        self.lr, self.warmup = lr, warmup
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
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=False)


class FullBatchGD(pl.LightningModule):
    """Full-batch gradient descent, tanh MLP, MSE on one-hot digits (Cohen et al.'s setting); the learning rate
    ramps linearly from 0.02 to ``lr_max`` over ``ramp`` steps, pushing the run past the edge of stability."""

    def __init__(self, lr_max: float, ramp: int = 500) -> None:
        super().__init__()
        self.lr_max, self.ramp = lr_max, ramp
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        x, y, _, _ = digits_tensors()
        self.x, self.target = x, nn.functional.one_hot(y, 10).float()

    def training_step(self, batch, batch_idx):
        x, target = batch
        return 0.5 * (self.net(x) - target).pow(2).sum(1).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        ramp = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.02 + (self.lr_max - 0.02) * min(1.0, s / self.ramp)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.target), batch_size=len(self.x), shuffle=False)


class DigitsMLP(pl.LightningModule):
    """Digits classifier: a deep ReLU MLP without normalisation (He init, SGD with momentum), or a small MLP with
    Adam whose batches are corrupted (inputs x1000, labels shifted) for ``corrupt`` steps."""

    def __init__(self, depth: int, lr: float, optimizer: str, corrupt: range = range(0)) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.corrupt = lr, optimizer, corrupt
        layers: list[nn.Module] = [nn.Linear(64, 128), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(128, 10))
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        x, y, _, _ = digits_tensors()
        self.data = TensorDataset(x, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step in self.corrupt:
            x, y = x * 1000.0, (y + 1) % 10  # a corrupted batch: wrong scaling and shifted labels upstream
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@dataclass
class Scenario:
    name: str
    what: str
    steps: int
    unstable: Any  # () -> LightningModule
    control: Any
    dense_every: int  # cadence of the slow signals in the dense run


SCENARIOS = [
    Scenario(
        "transformer-high-lr",
        "char transformer, AdamW lr 0.1 (control 3e-3), 50 warm-up steps",
        150,
        lambda: CharLM(0.1, 150),
        lambda: CharLM(3e-3, 150),
        10,
    ),
    Scenario(
        "gd-past-eos",
        "full-batch GD on digits, lr ramped 0.02 -> 4 over 500 steps (control -> 0.3)",
        300,
        lambda: FullBatchGD(4.0),
        lambda: FullBatchGD(0.3),
        10,
    ),
    Scenario(
        "deep-no-norm",
        "16-layer ReLU MLP without normalisation, SGD+momentum lr 0.05 (control 0.01)",
        250,
        lambda: DigitsMLP(16, 0.05, "sgd"),
        lambda: DigitsMLP(16, 0.01, "sgd"),
        10,
    ),
    Scenario(
        "corrupted-burst",
        "3-layer MLP, Adam 1e-3, corrupted batches at steps 150-154 (control: clean)",
        200,
        lambda: DigitsMLP(3, 1e-3, "adam", corrupt=range(150, 155)),
        lambda: DigitsMLP(3, 1e-3, "adam"),
        10,
    ),
]


# ------------------------------------------------------------------------------------------------- recording
class Trajectory(pl.Callback):
    """Per-step loss and gradient norm; stops the run 10 steps after divergence (nothing left to warn about)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.divergence: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(torch._foreach_norm(grads)).norm()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.losses.append(loss)
        step = len(self.losses) - 1
        if self.divergence is None and step >= 10 and (not math.isfinite(loss) or loss > 1.5 * self.losses[0]):
            self.divergence = step
        if self.divergence is not None and step >= self.divergence + 10:
            trainer.should_stop = True


def zclip_first_alert(grad_norms: list[float]) -> int | None:
    """First step at which ZClip's own statistics score the gradient norm above its threshold."""
    from zclip import ZClip

    rule = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, mode="zscore")
    for step, norm in enumerate(grad_norms):
        if not math.isfinite(norm):
            return step
        if rule.initialized:
            z, _std = rule._compute_positive_zscore(norm)
            if z > rule.z_thresh:
                return step
            rule._update_ema(norm)  # below the threshold ZClip updates with the norm itself
        else:
            rule.buffer.append(norm)
            if len(rule.buffer) >= rule.warmup_steps:
                rule._initialize_ema()
    return None


def kill_loss_spike_first_alert(losses: list[float], window: int = 100, patience: int = 4) -> int | None:
    """llm-foundry's KillLossSpike rule: more than ``patience`` consecutive losses >= 2x the mean of the last
    ``window`` (nothing before the window is full); a non-finite loss counts as an outlier."""
    history: deque[float] = deque(maxlen=window)
    outliers = 0
    for step, loss in enumerate(losses):
        if len(history) == window:
            outliers = outliers + 1 if not math.isfinite(loss) or loss >= 2 * sum(history) / window else 0
            if outliers > patience:
                return step
        if math.isfinite(loss):
            history.append(loss)
    return None


def first_alerts(alerts: list) -> dict[str, int]:
    first: dict[str, int] = {}
    for alert in alerts:
        first.setdefault(alert.kind, alert.step)
    return first


def train(make, steps: int, callbacks: list[pl.Callback], root: str, name: str) -> Trajectory:
    pl.seed_everything(0, verbose=False)  # before the module is built: its initial weights are part of the run
    module = make()
    trajectory = Trajectory()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[trajectory, *callbacks],
        log_every_n_steps=10,
    )
    trainer.fit(module)
    return trajectory


def dense_monitors(every: int, record) -> list[pl.Callback]:
    shared = {"on_alert": record, "alert_cooldown_steps": 0}
    monitors = [
        GradientSpikeMonitor(**shared),
        HessianMonitor(every_n_steps=every, num_probe_batches=1, **shared),
        EffectiveRankMonitor(every_n_steps=every, num_probe_batches=1, **shared),
        ModeConnectivityMonitor(every_n_steps=every, num_probe_batches=1, **shared),
    ]
    return [*monitors, LogitMonitor(**shared)]


def run_scenario(scenario: Scenario, root: str) -> list[dict[str, Any]]:
    rows = []
    for variant in ("unstable", "control"):
        make = scenario.unstable if variant == "unstable" else scenario.control
        alerts: list = []
        started = time.perf_counter()
        trajectory = train(
            make, scenario.steps, dense_monitors(scenario.dense_every, alerts.append), root, scenario.name
        )
        bundle_alerts: list = []
        bundle = LandscapeMonitor(on_alert=bundle_alerts.append)
        train(make, scenario.steps, [bundle], root, scenario.name)
        first = first_alerts(alerts)
        first["LandscapeMonitor() (any)"] = min((a.step for a in bundle_alerts), default=None)
        bundle_kind = min(bundle_alerts, key=lambda a: a.step).kind if bundle_alerts else None
        first["baseline: ZClip z > 2.5"] = zclip_first_alert(trajectory.grad_norms)
        first["baseline: KillLossSpike"] = kill_loss_spike_first_alert(trajectory.losses)
        rows.append(
            {
                "scenario": scenario.name,
                "variant": variant,
                "divergence": trajectory.divergence,
                "first": {k: v for k, v in first.items() if v is not None},
                "bundle_first_kind": bundle_kind,
                # budget mode's choices in the bundle's run: every how many steps the gradients were read at the
                # end, and how many measurements each periodic part made
                "bundle_gradient_stride": bundle.parts["grad_spikes"].stride,
                "bundle_measurements": {n: p.num_measurements for n, p in bundle.parts.items() if n != "grad_spikes"},
                "seconds": time.perf_counter() - started,
                "losses": trajectory.losses,
                "grad_norms": trajectory.grad_norms,
            }
        )
        print(
            f"  {scenario.name} {variant}: divergence {trajectory.divergence}, alerts {rows[-1]['first']}; bundle: "
            f"gradients every {rows[-1]['bundle_gradient_stride']} step(s), {rows[-1]['bundle_measurements']}",
            flush=True,
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | divergence step | signal | first alert (unstable) | lead (steps) | alerts on control |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    by_name: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_name.setdefault(row["scenario"], {})[row["variant"]] = row
    for name, variants in by_name.items():
        unstable, control = variants["unstable"], variants["control"]
        divergence = unstable["divergence"]
        signals = sorted(set(unstable["first"]) | set(control["first"]))
        if not signals:
            lines.append(f"| {name} | {divergence} | (none) | | | |")
        for signal in signals:
            step = unstable["first"].get(signal)
            lead = "" if step is None or divergence is None else divergence - step
            false_alarm = control["first"].get(signal)
            label = signal
            if signal.startswith("LandscapeMonitor") and unstable.get("bundle_first_kind"):
                label = f"LandscapeMonitor() (first: {unstable['bundle_first_kind']})"
            lines.append(
                f"| {name} | {divergence} | {label} | {'' if step is None else step} | {lead} | "
                f"{'none' if false_alarm is None else f'at step {false_alarm}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--dump", help="write every run's alerts, losses and gradient norms to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="early-warning-")
    print(f"torch {torch.__version__}; logs in {root}")
    rows = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        print(f"{scenario.name}: {scenario.what}", flush=True)
        rows += run_scenario(scenario, root)
    print()
    print(table(rows))
    if args.dump:
        Path(args.dump).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
