"""Does LandscapeMonitor slow the training step itself (outside its own hooks)?

    python benchmarks/step_interference.py --workload transformer --steps 150 --repeats 3

The budget ledger counts the time spent inside our hooks. Time outside them could still grow if a measurement left
something behind (a kernel selection, cold caches, threads, garbage). This script times the training step proper,
from the end of every callback's ``on_train_batch_start`` to the start of every ``on_train_batch_end``, in runs
without and with ``LandscapeMonitor()`` (alternating), and prints the median step time of each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent))
from grad_spikes import Workload

from lightning_landscape import LandscapeMonitor


class StepClock:
    """Two callbacks around the others: ``start`` goes last (its batch-start hook runs after ours), ``stop`` first
    (its batch-end hook runs before ours)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.steps: list[float] = []
        clock = self

        class Start(pl.Callback):
            def on_train_batch_start(self, *args):
                clock.started = time.perf_counter()

        class Stop(pl.Callback):
            def on_train_batch_end(self, *args):
                clock.steps.append(time.perf_counter() - clock.started)

        self.start, self.stop = Start(), Stop()


def run(kind: str, steps: int, with_bundle: bool, root: str) -> float:
    pl.seed_everything(0, verbose=False)
    clock = StepClock()
    monitors = [LandscapeMonitor(on_alert="ignore")] if with_bundle else []
    pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock.stop, *monitors, clock.start],
        log_every_n_steps=50,
    ).fit(Workload(kind))
    return statistics.median(clock.steps[10:]) * 1e3  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="transformer", choices=["mlp", "cnn", "transformer"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="interference-")
    medians: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_bundle in (False, True):
            medians[with_bundle].append(run(args.workload, args.steps, with_bundle, root))
    print("| workload | median step without (ms), per run | median step with LandscapeMonitor() (ms), per run |")
    print("| --- | --- | --- |")
    print(
        f"| {args.workload} | {', '.join(f'{m:.1f}' for m in medians[False])} | "
        f"{', '.join(f'{m:.1f}' for m in medians[True])} |"
    )


if __name__ == "__main__":
    main()
