"""GPU checks on a ~100M-parameter nanoGPT-style transformer: what a CPU cannot tell about our costs.

    python benchmarks/gpu.py                          # CUDA: a 12-layer, 768-wide GPT (~85M parameters), ~5 min
    python benchmarks/gpu.py --tiny --device cpu      # smoke test (seconds): the same code path on a toy model
    python benchmarks/gpu.py --json out.json          # also write the numbers as JSON

Four tables:

1. *HVP / gradient*: for each HVP backend, the median time of one Hessian-vector product on one probe batch over
   the median time of one gradient on it (same batch, ``HessianOperator.loss_and_gradient``), and the peak memory
   the product allocates above what the model and its gradients already hold. Timed with CUDA events around each
   call (on CPU the host clock).
2. *One measurement in training steps*: ``HessianMonitor`` at the bundle's configuration (top-1, one probe batch)
   measuring every ``--every`` steps in budget mode with a budget of 100% (so that it is timed exactly as budget
   mode times it, with CUDA events, yet never postponed), its cold and warm cost over the mean training step, and
   its HVPs.
3. *Per-step hooks*: ``LandscapeMonitor``'s gradient and logits parts over ``--steps`` steps, the host time of each
   per-step hook and the host-device synchronisations inside them: explicit ``torch.cuda.synchronize`` calls and
   the implicit ones ``torch.cuda.set_sync_debug_mode("warn")`` reports (``.item()``, ``.cpu()``, ...), per step
   without a measurement and per logits measurement. Budget mode promises no synchronisation in a step that
   measures nothing.
4. *LandscapeMonitor() at its defaults*: over ``--steps`` steps, the steps at which sharpness, rank and barriers
   were logged and the ledger (which on CUDA charges each measurement its device time).

Nothing here is needed by the test suite; ``tests/callbacks/test_budget_gpu.py`` runs ``--tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_landscape import HessianMonitor, LandscapeMonitor
from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core.budget import MIN_TIMED_STEPS
from lightning_landscape.core.hvp import HessianOperator, operator_mode
from tests.helpers.real_models import NanoGPT, lm_loss_fn

PER_STEP_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")


def make_model(tiny: bool) -> NanoGPT:
    if tiny:
        return NanoGPT(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, num_windows=64)
    return NanoGPT(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=8, num_windows=2048, lr=3e-4)


class Timer:
    """CUDA events on a CUDA device (one synchronisation, at the end), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
        fn()
        seconds = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                fn()
                seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)


def hvp_table(device: torch.device, tiny: bool, repeats: int) -> list[dict[str, Any]]:
    model = make_model(tiny).to(device)
    batch = [t.to(device) for t in next(iter(model.train_dataloader()))]
    timer = Timer(device)
    rows = []
    for backend in ("func", "double_backward", "graph"):
        with operator_mode(model, "eval"), differentiable_attention():
            try:
                op = HessianOperator(model, lm_loss_fn, [batch], backend=backend)
                vector = torch.randn(op.shape[0], device=device, dtype=op.dtype)
                gradient = timer(op.loss_and_gradient, repeats)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                product = timer(lambda op=op, vector=vector: op @ vector, repeats)
                peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else float("nan")
                op.close()
            except (RuntimeError, NotImplementedError) as err:  # a backend the model cannot use: say so, go on
                rows.append({"backend": backend, "error": str(err).splitlines()[0][:120]})
                continue
        rows.append(
            {
                "backend": backend,
                "gradient_ms": gradient * 1e3,
                "hvp_ms": product * 1e3,
                "ratio": product / gradient,
                "peak_extra_mib": peak / 2**20,
            }
        )
    parameters = sum(p.numel() for p in model.parameters())
    print(f"## HVP / gradient on one probe batch ({parameters / 1e6:.1f}M parameters, {device})\n")
    print("| backend | gradient (ms) | HVP (ms) | HVP / gradient | peak extra memory (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "error" in row:
            print(f"| {row['backend']} | failed: {row['error']} | | | |")
        else:
            print(
                f"| {row['backend']} | {row['gradient_ms']:.2f} | {row['hvp_ms']:.2f} | {row['ratio']:.2f} | "
                f"{row['peak_extra_mib']:.0f} |"
            )
    print()
    return rows


def trainer(device: torch.device, steps: int, callbacks: list[pl.Callback], root: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


class Clock(pl.Callback):
    """Wall time of the training loop (one synchronisation at each end, none per step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.start = self._now()

    def on_train_end(self, trainer, pl_module):
        self.seconds = self._now() - self.start


def measurement_table(device: torch.device, tiny: bool, steps: int, every: int, root: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    clock = Clock(device)
    trainer(device, steps, [clock], root).fit(make_model(tiny))
    step_s = clock.seconds / steps
    monitor = HessianMonitor(every_n_steps=every, num_probe_batches=1, max_overhead=1.0, on_alert="ignore")
    monitor.first_cost_steps = 0.0  # measure at the cadence from the first due step: this table times, not plans
    costs: list[tuple[float, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seconds = monitor.last_metrics.pop(monitor.key("seconds"), None)
            if seconds is not None:
                costs.append((seconds, monitor.last_metrics.get(monitor.key("hvps"), float("nan"))))

    pl.seed_everything(0, verbose=False)
    trainer(device, steps, [monitor, Record()], root).fit(make_model(tiny))
    cold = costs[0]
    warm = [c for c, _ in costs[1:]] or [float("nan")]
    result = {
        "step_ms": step_s * 1e3,
        "cold_steps": cold[0] / step_s,
        "warm_steps": statistics.median(warm) / step_s,
        "hvps": [h for _, h in costs],
        "measurements": len(costs),
    }
    print("## One Hessian measurement (top-1, one probe batch, timed as budget mode times it)\n")
    print("| step (ms) | cold (steps) | warm, median (steps) | HVPs per measurement |")
    print("| ---: | ---: | ---: | --- |")
    print(
        f"| {result['step_ms']:.1f} | {result['cold_steps']:.1f} | {result['warm_steps']:.1f} | "
        f"{', '.join(f'{h:.0f}' for h in result['hvps'])} |\n"
    )
    return result


class HookProbe:
    """Wraps a callback's per-step hooks: host seconds and synchronisations inside each, per step."""

    def __init__(self, callback: pl.Callback, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PER_STEP_HOOKS, 0.0)
        self.syncs_by_step: dict[int, int] = {}
        self.explicit = 0
        for hook in PER_STEP_HOOKS:
            setattr(callback, hook, self._wrap(hook, getattr(callback, hook)))

    def _wrap(self, hook: str, method: Callable[..., None]) -> Callable[..., None]:
        def wrapped(trainer, *args):
            syncs = 0
            if self.cuda:
                original = torch.cuda.synchronize

                def counting(*a, **k):
                    nonlocal syncs
                    syncs += 1
                    self.explicit += 1
                    return original(*a, **k)

                torch.cuda.synchronize = counting
                torch.cuda.set_sync_debug_mode("warn")
            started = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    method(trainer, *args)
            finally:
                self.seconds[hook] += time.perf_counter() - started
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
                    torch.cuda.synchronize = original
            syncs += sum("synchroniz" in str(w.message) for w in caught)
            step = trainer.global_step
            self.syncs_by_step[step] = self.syncs_by_step.get(step, 0) + syncs

        return wrapped


def hooks_table(device: torch.device, tiny: bool, steps: int, root: str) -> dict[str, Any]:
    monitor = LandscapeMonitor(hessian=False, rank=False, connectivity=False, on_alert="ignore", dashboard=False)
    probe = HookProbe(monitor, device)
    logits = monitor.parts["logits"]
    measured_steps: list[int] = []
    original_run = logits._run

    def run(trainer, pl_module, step):
        measured_steps.append(step)
        return original_run(trainer, pl_module, step)

    logits._run = run
    pl.seed_everything(0, verbose=False)
    trainer(device, steps, [monitor], root).fit(make_model(tiny))
    quiet = [s for s in probe.syncs_by_step if s not in measured_steps]
    result = {
        "hook_ms_per_step": {hook: seconds / steps * 1e3 for hook, seconds in probe.seconds.items()},
        "syncs_per_quiet_step": sum(probe.syncs_by_step[s] for s in quiet) / max(1, len(quiet)),
        "syncs_per_logits_step": sum(probe.syncs_by_step.get(s, 0) for s in measured_steps)
        / max(1, len(measured_steps)),
        "explicit_synchronize_calls": probe.explicit,
        "gradient_stride": monitor.parts["grad_spikes"].stride,
        "counted": device.type == "cuda",
    }
    print(f"## Per-step hooks of LandscapeMonitor's gradient and logits parts ({steps} steps)\n")
    print(
        "| hook | host ms per step |\n| --- | ---: |\n"
        + "\n".join(f"| {hook} | {ms:.3f} |" for hook, ms in result["hook_ms_per_step"].items())
    )
    counted = "" if result["counted"] else " (not counted: no CUDA)"
    print(
        f"\nsynchronisations{counted}: {result['syncs_per_quiet_step']:.2f} per step without a measurement, "
        f"{result['syncs_per_logits_step']:.2f} per logits measurement; explicit torch.cuda.synchronize calls: "
        f"{result['explicit_synchronize_calls']}; gradient stride {result['gradient_stride']}\n"
    )
    return result


def bundle_table(device: torch.device, tiny: bool, steps: int, root: str) -> dict[str, Any]:
    monitor = LandscapeMonitor(on_alert="ignore", dashboard=False)
    logged: dict[str, list[int]] = {"hessian": [], "rank": [], "connectivity": []}
    keys = {"hessian": "sharpness", "rank": "/rank/", "connectivity": "lmc/barrier"}
    for name in logged:
        part = monitor.parts[name]

        def record(trainer, metrics, step, name=name, log=part.log_metrics):
            if any(keys[name] in key for key in metrics):
                logged[name].append(step)
            return log(trainer, metrics, step)

        part.log_metrics = record
    pl.seed_everything(0, verbose=False)
    trainer(device, steps, [monitor], root).fit(make_model(tiny))
    ledger = monitor.budget
    training = ledger.training_time()
    result = {
        "logged": logged,
        "ledger": ledger.overhead(),
        "by_part": {
            n: (ledger.cost_by_owner.get(id(part), 0.0) + ledger.first_cost_by_owner.get(id(part), 0.0)) / training
            for n, part in monitor.parts.items()
        },
    }
    print(f"## LandscapeMonitor() at its defaults over {steps} steps\n")
    print("| signal | logged at steps |\n| --- | --- |")
    for name, values in logged.items():
        print(f"| {name} | {', '.join(map(str, values)) or 'none'} |")
    by_part = ", ".join(f"{n} {v:.2%}" for n, v in result["by_part"].items())
    print(f"\nledger {result['ledger']:.2%} (measurements by part: {by_part})\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model and few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="steps of tables 3 and 4 (default 1000, tiny 40)")
    parser.add_argument("--every", type=int, default=None, help="cadence of table 2 (default 50, tiny 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 10, tiny 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available (use --device cpu --tiny for a smoke test)")
    steps = args.steps or (40 if args.tiny else 1000)
    every = args.every or (5 if args.tiny else 50)
    repeats = args.repeats or (2 if args.tiny else 10)
    root = tempfile.mkdtemp(prefix="gpu-check-")
    print(f"torch {torch.__version__}, device {device}, {'tiny' if args.tiny else 'full'} model\n")
    results = {
        "device": str(device),
        "hvp": hvp_table(device, args.tiny, repeats),
        "measurement": measurement_table(
            device, args.tiny, max(steps // 4, MIN_TIMED_STEPS + 3 * every + 1), every, root
        ),
        "hooks": hooks_table(device, args.tiny, steps, root),
        "bundle": bundle_table(device, args.tiny, steps, root),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
