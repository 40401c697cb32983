"""The path of one measurement: timed, inside the model-state guard, failures agreed by every rank, its cost
charged to the monitor's scheduler, its metrics logged, then the alert decision point."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from lightning_landscape.callbacks._alerting import LandscapeAlertError
from lightning_landscape.callbacks._failures import (
    _agree_failed,
    _failure_aware_collectives,
    _PeerMeasurementFailed,
    report_failure,
)
from lightning_landscape.callbacks._guard import _logging_suppressed, model_state_guard
from lightning_landscape.core import distributed
from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core.budget import MeasurementTimer

if TYPE_CHECKING:
    from lightning_landscape.callbacks._base import LandscapeCallback


def run_measurement(monitor: LandscapeCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
    """Run ``monitor.measure`` on its probe set (on the module's device for this call only) and report it.

    Under DDP rank 0's buffers are broadcast first (the guard gives each rank its own back); a failure on any rank
    makes every rank skip the measurement together (status 0, one warning per kind of error), ``strict`` raises.
    Logs ``{group}/status``, ``{group}/seconds`` and, in budget mode, ``{prefix}/budget/overhead``.
    """
    timer = MeasurementTimer(pl_module.device) if monitor.budget is not None else None
    if timer is not None:
        timer.start()
    started = time.perf_counter()
    monitor.num_measurements += 1
    distributed_run = trainer.world_size > 1
    failure: BaseException | None = None
    metrics: dict[str, float] = {}
    with (
        model_state_guard(pl_module),
        _logging_suppressed(pl_module),
        torch.enable_grad(),
        differentiable_attention(),
    ):
        if distributed_run:
            # DDP broadcasts rank 0's buffers at the start of each forward, but between steps every rank
            # holds running statistics updated by its own batches. Measure every rank on rank 0's buffers
            # (what the next forward would use); the guard gives each rank its own back afterwards.
            for buffer in pl_module.buffers():
                distributed.broadcast(buffer)
        try:
            with _failure_aware_collectives(pl_module.device, enabled=distributed_run):
                batches = monitor.probe_batches(pl_module)
                metrics = monitor.measure(trainer, pl_module, batches, step)
        except LandscapeAlertError:
            raise  # on_alert="raise" is the user's choice, not a failure (every rank raises it: reduced values)
        except Exception as err:  # user code, OOM, library errors; KeyboardInterrupt and SystemExit pass
            failure = err
        finally:
            batches = []  # the device copy of the probe set lives only as long as the measurement
    failed = failure is not None
    if distributed_run and not isinstance(failure, _PeerMeasurementFailed):
        # The ranks agree before any later collective: a rank that failed answers here the status check its
        # peers make before their next collective inside `measure` (or their own agreement), so nobody waits.
        failed = _agree_failed(failed, pl_module.device)
    if failed:
        monitor._report_failure(failure, step)
        metrics = {monitor.key("status"): 0.0}
    else:
        metrics[monitor.key("status")] = 1.0
    # budget mode on CUDA: the device span too (one synchronisation), so that the ledger is true on a GPU
    cost = timer.stop() if timer is not None else time.perf_counter() - started
    metrics[monitor.key("seconds")] = cost
    overhead = monitor.schedule.charge(cost, cold_first=monitor.first_is_cold)
    if overhead is not None:
        metrics[f"{monitor.prefix}/budget/overhead"] = overhead
    monitor.last_metrics = metrics
    monitor.log_metrics(trainer, metrics, step)
    monitor._after_measurement(trainer)


def report_monitor_failure(monitor: LandscapeCallback, failure: BaseException | None, step: int) -> None:
    """Warn once per kind of failure (naming the monitor, the step and the error), or raise with ``strict``."""
    report_failure(
        failure,
        name=type(monitor).__name__,
        step=step,
        status_key=monitor.key("status"),
        strict=monitor.strict,
        warned=monitor._warned,
        warn_once=monitor._warn_once,
    )


__all__ = ["report_monitor_failure", "run_measurement"]
