"""Two-process CPU DDP over gloo for the tests: a script runs in a subprocess with a timeout, so a hang fails."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def run_ddp_script(script: str, out: Path, *args: str) -> None:
    """Run ``tests/callbacks/{script}`` with ``out`` and ``args``; fail the test on a hang or a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "callbacks" / script), str(out), *args],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process DDP run hung (killed after {TIMEOUT_S} s): {err}")
    assert proc.returncode == 0, proc.stderr[-4000:]


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ddp_trainer(out: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet two-process CPU DDP Trainer.

    It also destroys the process group when the process exits: Lightning does so only for NCCL, and with torch
    2.13 a gloo group still alive at interpreter exit aborts the process ("terminate called without an active
    exception", SIGABRT) in about one exit of six here, which failed a run whose training and checks had passed.
    """
    atexit.register(_destroy_process_group)
    settings = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(out),
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


class DumpMeasurement(pl.Callback):
    """Saves the weights seen by the measurement at ``step`` (rank 0), and every rank's metrics and probe set."""

    def __init__(self, out: Path, monitor: Any, step: int = 1) -> None:
        self.out, self.monitor, self.step = out, monitor, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            torch.save({k: v.clone() for k, v in pl_module.state_dict().items()}, self.out / "weights.pt")

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"metrics_rank{rank}.json").write_text(json.dumps(self.monitor.last_metrics))
        torch.save(self.monitor._probe, self.out / f"probe_rank{rank}.pt")


def without_timings(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics minus wall-clock ones (``*/seconds``, ``*/budget/*``), which each rank measures on its own clock."""
    return {k: v for k, v in metrics.items() if not k.endswith("/seconds") and "/budget/" not in k}


def load_dumps(out: Path) -> tuple[list[dict], list[Any], dict]:
    """Both ranks' metrics (checked equal and non-empty), the union of the probe sets, and rank 0's weights."""
    metrics = [without_timings(json.loads((out / f"metrics_rank{r}.json").read_text())) for r in (0, 1)]
    assert metrics[0], "rank 0 logged nothing"
    assert metrics[0] == metrics[1], "every rank must compute the same numbers"
    union = [batch for r in (0, 1) for batch in torch.load(out / f"probe_rank{r}.pt")]
    return metrics, union, torch.load(out / "weights.pt")
