"""Seconds of each LogitMonitor measurement on a compiled model (issue 17 item 2: the first pass took 10-60 s).

``NanoGPT(compile_model=True)`` (inductor) on CPU, ``LogitMonitor(every_n_steps=5)``, 16 steps; prints
``{prefix}/logits/seconds`` of every measurement and the wall time of every training step (the step's own first
compile is training's, not ours).

Usage: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/logit_compile.py``
"""

from __future__ import annotations

import time

import lightning.pytorch as pl

from lightning_landscape import LogitMonitor
from tests.helpers.real_models import NanoGPT


class Times(pl.Callback):
    def __init__(self, monitor: LogitMonitor) -> None:
        self.monitor, self.seen, self.steps, self.started = monitor, [], [], 0.0

    def on_train_batch_start(self, *args) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append(time.perf_counter() - self.started)
        seconds = self.monitor.last_metrics.get("landscape/logits/seconds")
        if seconds is not None and (not self.seen or self.seen[-1][1] != seconds):
            self.seen.append((trainer.global_step - 1, seconds))


def main() -> None:
    pl.seed_everything(0)
    monitor = LogitMonitor(every_n_steps=5)
    times = Times(monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=16,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, times],
    )
    trainer.fit(NanoGPT(compile_model=True))
    print("measurement seconds (step, s):", [(s, round(v, 3)) for s, v in times.seen])
    print("step wall times (s):", [round(x, 2) for x in times.steps])


if __name__ == "__main__":
    main()
