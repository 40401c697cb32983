"""River vs mountain on a Warmup-Stable-Decay schedule: ``update_top_fraction`` by phase, and a Hessian-axes surface.

Wen et al., "Understanding Warmup-Stable-Decay Learning Rates: A River Valley Loss Landscape Perspective" (arXiv
2410.05192): at a high constant learning rate the iterate oscillates across the steep directions of a valley while
it progresses along its flat floor; the fast decay at the end removes the oscillation. ``HessianMonitor``'s
``update_top_fraction`` (the share of each update's squared norm in the span of the top-k Hessian eigenvectors of
the latest measurement) should then be high in the stable phase and fall in the decay.

The run: the nanoGPT-style character transformer of ``tests/helpers/real_models.py`` on the stdlib-source corpus,
AdamW, linear warm-up, constant, then a fast linear decay to 0 (the last ``decay`` share of the steps). The monitor
measures the top-k eigenvectors of the Hessian itself every ``--every`` steps (``raw_sharpness_every=1``, so the
vectors are fresh under AdamW too) and logs ``update_top_fraction`` at every logging step (``log_every_n_steps``).
It also draws the Hessian-axes surface at the last measurement of the stable phase and saves it as
``docs/images/hessian_surface.png`` (``--save-surface``).

    PYTHONPATH=$PWD python benchmarks/wsd.py            # markdown table (copied into benchmarks/RESULTS.md)
    PYTHONPATH=$PWD python benchmarks/wsd.py --fast     # shorter run, same phases
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the real models live with the tests

from lightning_landscape import HessianMonitor, LandscapeWarning  # noqa: E402
from lightning_landscape import tensorboard as tb  # noqa: E402
from lightning_landscape.callbacks._hessian_views import surface_figure  # noqa: E402
from tests.helpers.real_models import NanoGPT, lm_loss_fn  # noqa: E402


def wsd_factor(step: int, total: int, warmup: int, decay: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, constant, linear decay to 0 over the last ``decay``."""
    if step < warmup:
        return (step + 1) / warmup
    start = total - decay
    if step < start:
        return 1.0
    return max(0.0, (total - step) / decay)


class WSDGPT(NanoGPT):
    def __init__(self, total: int, warmup: int, decay: int, optimizer: str = "adamw", **kwargs) -> None:
        super().__init__(**kwargs)
        self.total, self.warmup, self.decay, self.optimizer_name = total, warmup, decay, optimizer

    def configure_optimizers(self):
        hp = self.hparams
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: wsd_factor(step, self.total, self.warmup, self.decay)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Surfaces(pl.Callback):
    """Keeps each new surface with its step and eigenvalues (after the monitor's measurement of that step)."""

    def __init__(self, monitor: HessianMonitor) -> None:
        self.monitor, self.seen, self.ratios, self.seconds = monitor, [], {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.monitor._last_measured_step
        ratio = self.monitor.last_metrics.get("landscape/hessian/eos_ratio")
        if step >= 0 and step not in self.ratios and ratio is not None:
            self.ratios[step] = (ratio, self.monitor.last_metrics.get("landscape/sharpness", float("nan")))
            drew = "landscape/hessian/surface_loss" in self.monitor.last_metrics
            self.seconds.setdefault("with surface" if drew else "without", []).append(
                self.monitor.last_metrics["landscape/hessian/seconds"]
            )
        surface = self.monitor._views.last_surface
        if surface is not None and (not self.seen or self.seen[-1][1] is not surface):
            m = self.monitor.last_metrics
            eig = (m.get("landscape/hessian/eig_1", float("nan")), m.get("landscape/hessian/eig_2", float("nan")))
            self.seen.append((self.monitor._last_measured_step, surface, eig))


def phase_of(step: int, total: int, warmup: int, decay: int) -> str:
    """The phase of the update that produced the parameters at ``step`` (update ``step - 1``)."""
    s = step - 1
    if s < warmup:
        return "warm-up"
    start = total - decay
    if s < start:
        return "stable (1st half)" if s < warmup + (start - warmup) // 2 else "stable (2nd half)"
    return "decay (1st half)" if s < start + decay // 2 else "decay (2nd half)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a shorter run (same phases)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-2 AdamW, 0.3 SGD)")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--every", type=int, default=None, help="steps between Hessian measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-surface", type=Path, default=None, help="write the stable-phase surface PNG here")
    parser.add_argument("--logdir", type=Path, default=None, help="also write TensorBoard logs (images included) here")
    args = parser.parse_args()
    total = args.steps or (240 if args.fast else 480)
    every = args.every or (20 if args.fast else 30)
    warmup, decay = total // 10, total // 5
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True)
    warnings.filterwarnings("ignore", category=LandscapeWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    lr = args.lr if args.lr is not None else (0.3 if args.optimizer == "sgd" else 1e-2)
    model = WSDGPT(total, warmup, decay, args.optimizer, lr=lr, num_windows=512, seed=args.seed)
    stable_end = total - decay
    measurements = list(range(0, total, every))
    stable_index = max(i for i, s in enumerate(measurements) if s <= stable_end)
    monitor = HessianMonitor(
        top_k=args.top_k,
        every_n_steps=every,
        num_probe_batches=2,
        loss_fn=lm_loss_fn,
        raw_sharpness_every=1,
        tol=1e-2,
        update_top_fraction=True,
        surface=True,
        surface_every=max(1, stable_index),
        surface_grid=9,
    )
    surfaces = Surfaces(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=total,
        logger=TensorBoardLogger(str(args.logdir), name="wsd") if args.logdir is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        callbacks=[monitor, surfaces],
        default_root_dir="/tmp/wsd_benchmark",
    )
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    n = sum(p.numel() for p in model.parameters())
    rows: dict[str, list[float]] = {}
    for step, fraction in monitor._views.update_fractions:
        rows.setdefault(phase_of(step, total, warmup, decay), []).append(fraction)
    print(
        f"WSD on the nanoGPT-style character model ({n} parameters), {args.optimizer} peak lr {lr}, {total} steps "
        f"(warm-up {warmup}, stable {total - warmup - decay}, decay {decay}), top-{args.top_k} eigenvectors "
        f"measured every {every} steps; update_top_fraction every 5 steps; chance level k/n = {args.top_k / n:.1e}; "
        f"{seconds:.0f} s.\n"
    )
    ratios: dict[str, list[tuple[float, float]]] = {}
    for step, pair in surfaces.ratios.items():
        ratios.setdefault(phase_of(step + 1, total, warmup, decay), []).append(pair)
    print("(sharpness and eos_ratio: medians over the measurements in the phase; under AdamW eos_ratio is the")
    print("preconditioned sharpness over Adam's threshold)\n")
    print("| phase | logged steps | update_top_fraction median | mean | min | max | sharpness | eos_ratio |")
    print("|---|---|---|---|---|---|---|---|")
    order = ["warm-up", "stable (1st half)", "stable (2nd half)", "decay (1st half)", "decay (2nd half)"]
    for phase in order:
        values = rows.get(phase, [])
        if not values:
            continue
        measured = ratios.get(phase, [])
        eos = statistics.median(r for r, _ in measured) if measured else float("nan")
        sharp = statistics.median(s for _, s in measured) if measured else float("nan")
        print(
            f"| {phase} | {len(values)} | {statistics.median(values):.3f} | {statistics.mean(values):.3f} | "
            f"{min(values):.3f} | {max(values):.3f} | {sharp:.3g} | {eos:.3g} |"
        )
    for step, surface, eig in surfaces.seen:
        print(
            f"\nsurface at step {step}: lambda_1 {eig[0]:.4g}, lambda_2 {eig[1]:.4g}, radius "
            f"{float(surface.alphas[-1]):.3g}, centre loss {surface.centre:.4f}, second differences "
            f"{surface.curvature(0):.4g} / {surface.curvature(1):.4g}, {surface.num_evaluations} grid evaluations"
        )
    timing = {k: statistics.median(v) for k, v in surfaces.seconds.items()}
    print(f"\nmedian measurement seconds: {', '.join(f'{k} {v:.2f} s' for k, v in timing.items())}")
    if args.save_surface is not None and surfaces.seen:
        step, surface, eig = min(surfaces.seen, key=lambda item: abs(item[0] - measurements[stable_index]))
        figure = surface_figure(surface, eig, f"nanoGPT char model, WSD stable phase, step {step}")
        args.save_surface.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.save_surface)
        tb.pyplot().close(figure)
        print(f"\nsaved {args.save_surface}")


if __name__ == "__main__":
    main()
