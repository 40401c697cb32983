"""Early warning, measured: instability scenarios with matched stable controls, lead time of every signal.

    python benchmarks/early_warning.py            # the whole suite (wall time in benchmarks/RESULTS.md)
    python benchmarks/early_warning.py --only transformer-high-lr gpt-sdpa-high-lr
    python benchmarks/early_warning.py --fast     # every scenario cut to a few steps: checks the plumbing only

Each *paired* scenario is trained with the same seed as *unstable* and as its *control* (the same setup at a safe
learning rate, or without the corruption); the *healthy* scenarios are 1000-step controls on their own (nanoGPT,
Hugging Face GPT-2 and Lightning's demo transformer at ordinary settings), where any alert is a false alarm. Every
monitor watches the runs with ``on_alert`` recording alerts (monitors never change training, so the trajectories
are those of an unmonitored run):

- the fast signals at their defaults: ``GradientSpikeMonitor`` (``grad_spike``, ``loss_spike``, ``non_finite``,
  ``grad_growth`` and any other kind it has) and ``LogitMonitor`` (``attention_logit_growth``; ``logit_divergence``
  and ``alignment_collapse`` are off by default);
- the slow signals at a dense fixed cadence, to see what they could tell: ``HessianMonitor`` (``edge_of_stability``,
  ``sharpness_growth``), ``EffectiveRankMonitor`` (``rank_collapse``), ``ModeConnectivityMonitor`` (``barrier_rise``);
- ``LandscapeMonitor()`` exactly as a user adds it (defaults, 5% budget), in a separate run that trains to the end
  (its alerts after the divergence count too, with a negative lead);
- two baselines computed from the dense run's per-step gradient norms and losses: ZClip's z-score rule (the
  ``zclip`` package's own statistics: EMA alpha 0.97, z > 2.5 after 25 warm-up steps) and a KillLossSpike-style loss
  rule (llm-foundry: window 100, 5 consecutive losses >= 2x the window mean);
- rescue: each unstable scenario once more with ``LandscapeMonitor(on_alert="rollback")`` (the library's rollback
  arguments at their defaults), trained to the end. It *finishes healthy* when its last 20 losses are finite and
  their mean is within 1.3x the mean of its control's last 20. Where the installed library has no ``"rollback"``
  action (its ``on_alert`` validation rejects it) the column reads "n/a (not implemented)". The bundle's run at
  ``on_alert`` recording is the same test without rollback.

Divergence step: the first step (after 10) whose training loss is non-finite or above 1.5x the loss at step 0. Lead time
= divergence step - first alert step (positive: the alert came first). An alert on a control is a false alarm.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the real models live with the tests
from _data import digits_tensors
from grad_spikes import CharTransformer, stdlib_text
from grokking import ModularMLP

from lightning_landscape import (
    EffectiveRankMonitor,
    GradientSpikeMonitor,
    HessianMonitor,
    LandscapeMonitor,
    LogitMonitor,
    ModeConnectivityMonitor,
)
from tests.helpers.real_models import HFGPT2, DemoTransformer, NanoGPT


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
    unstable: Any  # () -> LightningModule; None for a healthy control on its own
    control: Any
    dense_every: int  # cadence of the slow signals in the dense run
    logits: dict[str, Any] = field(default_factory=dict)  # LogitMonitor arguments (dense run and bundle)
    # whether "finishes healthy" (the last-20 loss against the control's) judges the run; False where the harm is
    # not in the training loss (softmax collapse: the loss falls while learning stops)
    loss_judges: bool = True


# Language models on the stdlib corpus of tests/helpers/real_models.py (1024 windows of 32 bytes, batch 8): a
# nanoGPT on F.scaled_dot_product_attention and Hugging Face's GPT2LMHeadModel from a tiny config, AdamW warmed up
# linearly over 400 steps towards a learning rate they cannot take; the loss creeps up over tens of steps and keeps
# climbing (it does not recover) while a run at 0.01 on the same schedule keeps learning.
GPT = {"n_embd": 64, "n_head": 4, "weight_decay": 0.0, "num_windows": 1024, "warmup_steps": 400}
GPT2 = {"attn_implementation": "sdpa", "num_windows": 1024, "warmup_steps": 400}


def _high_lr(name: str, model_text: str, steps: int, model: Any, config: dict[str, Any]) -> Scenario:
    """A language model at lr 0.6 on the warm-up schedule of ``config``, its control at 0.01."""
    return Scenario(
        name,
        f"{model_text}, AdamW warmed up over {config['warmup_steps']} steps towards lr 0.6 (control 0.01)",
        steps,
        lambda: model(lr=0.6, **config),
        lambda: model(lr=0.01, **config),
        10,
    )


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
    _high_lr("gpt-sdpa-high-lr", "nanoGPT (F.scaled_dot_product_attention, 2 layers, width 64)", 300, NanoGPT, GPT),
    _high_lr(
        "hf-gpt2-high-lr",
        "HF GPT2LMHeadModel from a tiny GPT2Config (sdpa attention, 2 layers, width 32)",
        350,
        HFGPT2,
        GPT2,
    ),
    Scenario(
        "gpt-sdpa-healthy",
        "nanoGPT as above, AdamW lr 3e-3 after 100 warm-up steps, weight decay 0.1, 1000 steps",
        1000,
        None,
        lambda: NanoGPT(lr=3e-3, **{**GPT, "warmup_steps": 100, "weight_decay": 0.1}),
        25,
    ),
    Scenario(
        "hf-gpt2-healthy",
        "HF GPT-2 as above, AdamW lr 3e-3 after 100 warm-up steps, 1000 steps",
        1000,
        None,
        lambda: HFGPT2(lr=3e-3, **{**GPT2, "warmup_steps": 100}),
        25,
    ),
    Scenario(
        "lightning-demo-healthy",
        "Lightning's demo LightningTransformer (nn.Transformer, its own SGD lr 0.1) on the corpus, 1000 steps",
        1000,
        None,
        lambda: DemoTransformer(num_windows=1024),
        25,
    ),
    # benchmarks/grokking.py's task. No divergence here: the harm is that learning stops (held-out accuracy stays at
    # chance, which grokking.py records), while the loss falls to ~1e-7, so the divergence and last-20 columns do
    # not judge this scenario; the alerts do (softmax_collapse on the unstable run, none on the control).
    Scenario(
        "grokking-softmax-collapse",
        "a + b mod 97, one-hot 2-layer MLP, full-batch AdamW lr 1e-2 betas (0.9, 0.95), float32, 40% of the pairs, "
        "no weight decay (control: weight decay 1.0, it groks); LogitMonitor(softmax_collapse_fraction=0.1)",
        1500,
        lambda: ModularMLP(0.0, 1500),
        lambda: ModularMLP(1.0, 1500),
        100,
        logits={"softmax_collapse_fraction": 0.1},
        loss_judges=False,
    ),
]

HEALTHY_WINDOW, HEALTHY_RATIO = 20, 1.3
FAST_STEPS, FAST_EVERY = 12, 4
BASELINES = ("baseline: ZClip z > 2.5", "baseline: KillLossSpike")
BUNDLE = "LandscapeMonitor() (any)"


# ------------------------------------------------------------------------------------------------- recording
class Trajectory(pl.Callback):
    """Per-step loss and gradient norm; with ``stop``, stops the run 10 steps after divergence (nothing left to
    warn about)."""

    def __init__(self, stop: bool = True) -> None:
        self.stop = stop
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
        if self.stop and self.divergence is not None and step >= self.divergence + 10:
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


def train(make, steps: int, callbacks: list[pl.Callback], root: str, name: str, stop: bool = True):
    """One seeded run; returns its trajectory and trainer."""
    pl.seed_everything(0, verbose=False)  # before the module is built: its initial weights are part of the run
    module = make()
    trajectory = Trajectory(stop)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[trajectory, *callbacks],
        log_every_n_steps=10,
    )
    trainer.fit(module)
    return trajectory, trainer


def dense_monitors(every: int, record, logits: dict[str, Any] | None = None) -> list[pl.Callback]:
    shared = {"on_alert": record, "alert_cooldown_steps": 0}
    monitors = [
        GradientSpikeMonitor(**shared),
        HessianMonitor(every_n_steps=every, num_probe_batches=1, **shared),
        EffectiveRankMonitor(every_n_steps=every, num_probe_batches=1, **shared),
        ModeConnectivityMonitor(every_n_steps=every, num_probe_batches=1, **shared),
    ]
    return [*monitors, LogitMonitor(**shared, **(logits or {}))]


def rollback_support() -> tuple[bool, str]:
    """Whether the installed library accepts ``on_alert="rollback"``, and its rollback arguments (at defaults)."""
    try:
        LandscapeMonitor(on_alert="rollback")
    except (ValueError, TypeError) as error:
        return False, f"rejected: {error}"
    names = [n for n in inspect.signature(LandscapeMonitor).parameters if "rollback" in n]
    return True, f"arguments at their defaults: {names or 'none'}"


def _count_rollbacks(trainer: pl.Trainer, bundle: LandscapeMonitor) -> float | None:
    """Rollbacks made in a run: the alert dispatcher's count where the library has one, else a logged
    ``*rollbacks`` metric (``landscape/rollbacks``), else None."""
    for owner in (bundle, *bundle.parts.values()):
        count = getattr(getattr(owner, "alerting", None), "rollbacks", None)
        if isinstance(count, int | float):
            return float(count)
    for metrics in (trainer.callback_metrics, trainer.logged_metrics):
        for key, value in metrics.items():
            if key.endswith("rollbacks"):
                return float(value)
    return None


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-HEALTHY_WINDOW:]
    return sum(tail) / len(tail) if tail and all(math.isfinite(x) for x in tail) else math.inf


def _bundle_run(
    make, steps: int, root: str, name: str, on_alert: list, logits: dict[str, Any] | None = None
) -> dict[str, Any]:
    alerts: list = []
    started = time.perf_counter()
    bundle = LandscapeMonitor(on_alert=[*on_alert, alerts.append], logits=logits or True)
    trajectory, trainer = train(make, steps, [bundle], root, name, stop=False)
    first = min(alerts, key=lambda a: a.step) if alerts else None
    return {
        "first": None if first is None else first.step,
        "first_kind": None if first is None else first.kind,
        "kinds": first_alerts(alerts),
        "divergence": trajectory.divergence,
        "steps_run": len(trajectory.losses),
        "tail_mean": _tail_mean(trajectory.losses),
        "rollbacks": _count_rollbacks(trainer, bundle),
        # budget mode's choices: every how many steps the gradients were read at the end, and how many
        # measurements each periodic part made
        "gradient_stride": bundle.parts["grad_spikes"].stride if "grad_spikes" in bundle.parts else None,
        "measurements": {n: p.num_measurements for n, p in bundle.parts.items() if n != "grad_spikes"},
        "seconds": time.perf_counter() - started,
        "losses": trajectory.losses,
    }


def _dense_run(
    make, steps: int, every: int, root: str, name: str, logits: dict[str, Any] | None = None
) -> dict[str, Any]:
    alerts: list = []
    started = time.perf_counter()
    trajectory, _ = train(make, steps, dense_monitors(every, alerts.append, logits), root, name)
    first = first_alerts(alerts)
    first[BASELINES[0]] = zclip_first_alert(trajectory.grad_norms)
    first[BASELINES[1]] = kill_loss_spike_first_alert(trajectory.losses)
    return {
        "divergence": trajectory.divergence,
        "first": {k: v for k, v in first.items() if v is not None},
        "tail_mean": _tail_mean(trajectory.losses),
        "seconds": time.perf_counter() - started,
        "losses": trajectory.losses,
        "grad_norms": trajectory.grad_norms,
    }


def _guarded(what: str, run, *args) -> dict[str, Any]:
    """A library failure in one run is recorded (and printed) instead of ending the suite."""
    try:
        return run(*args)
    except Exception as error:  # recorded and reported: the suite goes on
        print(f"  {what} FAILED: {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def run_scenario(scenario: Scenario, root: str, fast: bool = False, rollback: bool | None = None) -> dict[str, Any]:
    """Every run of one scenario: dense monitors and the bundle on each variant, and (unstable scenarios) the
    bundle with ``on_alert="rollback"``. ``fast`` cuts every run to a few steps (plumbing only)."""
    steps = min(scenario.steps, FAST_STEPS) if fast else scenario.steps
    every = FAST_EVERY if fast else scenario.dense_every
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "what": scenario.what,
        "steps": steps,
        "paired": False,
        "loss_judges": scenario.loss_judges,
    }
    variants = [("control", scenario.control)]
    if scenario.unstable is not None:
        result["paired"] = True
        variants.insert(0, ("unstable", scenario.unstable))
    for variant, make in variants:
        tag = f"{scenario.name}-{variant}"
        dense = _guarded(f"{tag} dense", _dense_run, make, steps, every, root, tag, scenario.logits)
        bundle = _guarded(f"{tag} bundle", _bundle_run, make, steps, root, tag, [], scenario.logits)
        result[variant] = {"dense": dense, "bundle": bundle}
        print(
            f"  {variant}: divergence {dense.get('divergence')}, alerts {dense.get('first', dense.get('error'))} "
            f"({dense.get('seconds', 0):.0f} s); LandscapeMonitor(): first {bundle.get('first_kind')} at "
            f"{bundle.get('first')}, gradients every {bundle.get('gradient_stride')} step(s), "
            f"{bundle.get('measurements', bundle.get('error'))} ({bundle.get('seconds', 0):.0f} s)",
            flush=True,
        )
    if scenario.unstable is not None:
        if rollback is None:
            rollback = rollback_support()[0]
        if rollback:
            tag = f"{scenario.name}-rollback"
            run = _guarded(tag, _bundle_run, scenario.unstable, steps, root, tag, ["rollback"], scenario.logits)
            result["rollback"] = run
            print(
                f"  rollback: {run.get('rollbacks')} rollback(s), alerts {run.get('kinds', run.get('error'))}, "
                f"last-{HEALTHY_WINDOW} mean {run.get('tail_mean', math.nan):.3g} ({run.get('seconds', 0):.0f} s)",
                flush=True,
            )
        else:
            result["rollback"] = None
    return result


# ---------------------------------------------------------------------------------------------------- report
def _lead(divergence: int | None, step: int | None) -> int | None:
    return None if divergence is None or step is None else divergence - step


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _healthy(tail_mean: float | None, control_tail: float | None) -> bool | None:
    if tail_mean is None or control_tail is None or not math.isfinite(control_tail):
        return None
    return math.isfinite(tail_mean) and tail_mean <= HEALTHY_RATIO * control_tail


def scenario_table(result: dict[str, Any]) -> str:
    """signal -> divergence step, first alert on the unstable run, lead, first alert on the control."""
    control_dense, control_bundle = result["control"]["dense"], result["control"]["bundle"]
    if "error" in control_dense or "error" in control_bundle:
        return f"(failed: {control_dense.get('error') or control_bundle.get('error')})"
    unstable = result.get("unstable")
    if unstable is not None and ("error" in unstable["dense"] or "error" in unstable["bundle"]):
        return f"(failed: {unstable['dense'].get('error') or unstable['bundle'].get('error')})"
    divergence = unstable["dense"]["divergence"] if unstable else None
    unstable_first = dict(unstable["dense"]["first"]) if unstable else {}
    control_first = dict(control_dense["first"])
    if unstable and unstable["bundle"]["first"] is not None:
        unstable_first[BUNDLE] = unstable["bundle"]["first"]
    if control_bundle["first"] is not None:
        control_first[BUNDLE] = control_bundle["first"]
    fired = set(unstable_first) | set(control_first)
    signals = [*sorted(fired - {BUNDLE, *BASELINES}), BUNDLE, *BASELINES]
    lines = [
        "| signal | divergence step | first alert (unstable) | lead (steps) | alerts on control |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for signal in signals:
        step = unstable_first.get(signal)
        false_alarm = control_first.get(signal)
        label = signal
        if signal == BUNDLE:
            kinds = [k for k in (unstable and unstable["bundle"]["first_kind"], control_bundle["first_kind"]) if k]
            label = "**LandscapeMonitor()**" + (f" (first: {', '.join(dict.fromkeys(kinds))})" if kinds else "")
        if unstable is None:
            first_cell = lead_cell = "-"
        else:
            first_cell = _cell(step) or "none"
            lead_cell = _cell(_lead(divergence, step))
        lines.append(
            f"| {label} | {_cell(divergence) or ('-' if unstable is None else 'none')} | {first_cell} | "
            f"{lead_cell} | {'none' if false_alarm is None else f'at step {false_alarm}'} |"
        )
    return "\n".join(lines)


def _loss_judges(name: str) -> bool:
    """A scenario's ``loss_judges`` by name (dumps written before the field existed)."""
    return next((s.loss_judges for s in SCENARIOS if s.name == name), True)


def summary_rows(results: list[dict[str, Any]], rollback_note: str) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        row: dict[str, Any] = {"scenario": result["scenario"], "paired": result["paired"]}
        control = result["control"]
        row["bundle_false_alarm"] = control["bundle"].get("first_kind"), control["bundle"].get("first")
        row["control_divergence"] = control["dense"].get("divergence")
        if result["paired"]:
            unstable = result["unstable"]
            divergence = unstable["dense"].get("divergence")
            row["divergence"] = divergence
            row["bundle_first"] = unstable["bundle"].get("first")
            row["bundle_kind"] = unstable["bundle"].get("first_kind")
            row["bundle_lead"] = _lead(divergence, row["bundle_first"])
            # a baseline that also alarms on the control is no detector: the fair comparison is with the quiet ones
            quiet, noisy = [], []
            for baseline in BASELINES:
                lead = _lead(divergence, unstable["dense"].get("first", {}).get(baseline))
                if lead is not None:
                    on_control = control["dense"].get("first", {}).get(baseline) is not None
                    (noisy if on_control else quiet).append((lead, baseline))
            row["best_baseline_lead"] = max(quiet, default=(None, None))[0]
            row["noisy_baselines"] = [f"{name[len('baseline: ') :]}: {lead}" for lead, name in noisy]
            control_tail = control["dense"].get("tail_mean")
            row["control_tail"] = control_tail
            row["plain_tail"] = unstable["bundle"].get("tail_mean")
            judged = result.get("loss_judges", _loss_judges(result["scenario"]))
            row["plain_healthy"] = _healthy(row["plain_tail"], control_tail) if judged else None
            rollback = result.get("rollback")
            if rollback is None:
                row["rollback"] = rollback_note
            elif "error" in rollback:
                row["rollback"] = f"failed: {rollback['error']}"
            else:
                healthy = _healthy(rollback["tail_mean"], control_tail) if judged else None
                verdict = {True: "healthy", False: "not healthy", None: "not judged by the loss"}[healthy]
                row["rollback"] = (
                    f"{verdict} (last-{HEALTHY_WINDOW} mean "
                    f"{rollback['tail_mean']:.3g}; {_cell(rollback['rollbacks']) or '?'} rollback(s))"
                )
                row["rollback_healthy"] = healthy
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | divergence | LandscapeMonitor() first alert | its lead | best baseline lead (quiet on control) | lead >= it "
        "| LandscapeMonitor() on control | control last-20 mean | unstable last-20 mean, no rollback | "
        'with on_alert="rollback" |',
        "| --- | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        kind, step = row["bundle_false_alarm"]
        control_cell = "none" if step is None else f"{kind} at {step}"
        if row["control_divergence"] is not None:
            control_cell += f" (control diverged at {row['control_divergence']}!)"
        if not row["paired"]:
            lines.append(f"| {row['scenario']} (healthy) | - | - | - | - | - | {control_cell} | | | - |")
            continue
        first = "none" if row["bundle_first"] is None else f"{row['bundle_kind']} at {row['bundle_first']}"
        lead, best = row["bundle_lead"], row["best_baseline_lead"]
        ok = lead is not None and lead > 0 and (best is None or lead >= best)
        best_cell = _cell(best) or "none"
        if row.get("noisy_baselines"):
            best_cell += f" ({'; '.join(row['noisy_baselines'])}, but it alarms on the control)"
        plain = "" if row["plain_tail"] is None else f"{row['plain_tail']:.3g}"
        if row["plain_healthy"] is not None:
            plain += " (healthy)" if row["plain_healthy"] else " (not healthy)"
        control_tail = "" if row["control_tail"] is None else f"{row['control_tail']:.3g}"
        lines.append(
            f"| {row['scenario']} | {_cell(row['divergence']) or 'none'} | {first} | {_cell(lead)} | {best_cell} | "
            f"{'yes' if ok else 'no'} | {control_cell} | {control_tail} | {plain} | {row['rollback']} |"
        )
    return "\n".join(lines)


def _load_dump(path: str) -> list[dict[str, Any]]:
    """The results of a ``--dump`` file (infinite means may have been written as strings by older versions)."""

    def restore(value: Any) -> Any:
        if isinstance(value, str) and value in ("inf", "-inf", "nan"):
            return float(value)
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(Path(path).read_text()))["results"]


def report(results: list[dict[str, Any]], rollback_note: str) -> list[dict[str, Any]]:
    """Print the per-scenario tables and the summary; returns the summary rows."""
    for result in results:
        print(f"### {result['scenario']}: {result['what']}\n")
        print(scenario_table(result))
        print()
    rows = summary_rows(results, rollback_note)
    print("### Summary\n")
    print(summary_table(rows))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--dump", help="write every run's alerts, losses and gradient norms to this JSON file")
    parser.add_argument("--fast", action="store_true", help=f"every run cut to {FAST_STEPS} steps (plumbing only)")
    parser.add_argument("--report", nargs="+", metavar="DUMP", help="only print the tables of these --dump files")
    args = parser.parse_args(argv)
    rollback_note = "n/a (not implemented)"
    if args.report:
        results = [result for path in args.report for result in _load_dump(path)]
        report(results, rollback_note)
        return results
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 cores, as in RESULTS.md
    root = tempfile.mkdtemp(prefix="early-warning-")
    supported, how = rollback_support()
    print(f"torch {torch.__version__}; logs in {root}; on_alert='rollback': {how}")
    started = time.perf_counter()
    results = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        print(f"{scenario.name}: {scenario.what}", flush=True)
        begun = time.perf_counter()
        results.append(run_scenario(scenario, root, fast=args.fast, rollback=supported))
        results[-1]["seconds"] = time.perf_counter() - begun
        print(f"  ({results[-1]['seconds']:.0f} s)", flush=True)
    print()
    rows = report(results, rollback_note)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.dump:  # Python's json writes and reads back Infinity (a run whose last losses are not finite)
        Path(args.dump).write_text(json.dumps({"results": results, "summary": rows}))
    return results


if __name__ == "__main__":
    main()
