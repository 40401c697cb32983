"""Failures of a measurement: every rank agrees that one failed, so that no rank waits in a collective its peers
skipped; the library's own argument errors are told apart from failures of the user's code."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_landscape.core import distributed
from lightning_landscape.core._validation import LandscapeWarning

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _is_configuration_error(err: BaseException) -> bool:
    """An argument error of ours (a ``loss_fn`` returning the wrong type, a selector matching nothing): raised by
    lightning-landscape's own checks, whose messages start by naming the argument in backticks. Those would fail at
    every measurement, so they are raised whatever ``strict`` (errors of the user's code or of libraries are not)."""
    if not isinstance(err, TypeError | ValueError) or not str(err).startswith("`"):
        return False
    tb_ = err.__traceback__
    while tb_ is not None and tb_.tb_next is not None:
        tb_ = tb_.tb_next
    return tb_ is not None and str(Path(tb_.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


class _PeerMeasurementFailed(RuntimeError):
    """Raised inside a measurement under DDP when another rank's measurement failed.

    See :func:`_failure_aware_collectives`."""


_COLLECTIVES = ("all_reduce_sum", "all_reduce_mean", "all_reduce_max", "broadcast", "any_true", "all_gather_object")


def _status_all_reduce(failed: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _agree_failed(failed: bool, device: torch.device) -> bool:
    """Whether the measurement failed on any rank (one 1-element all-reduce, the same as a status check)."""
    if not distributed.is_distributed():
        return failed
    return _status_all_reduce(failed, device)


@contextlib.contextmanager
def _failure_aware_collectives(device: torch.device, enabled: bool) -> Iterator[None]:
    """Precede every collective of ``core.distributed`` made inside a measurement by a 1-element status all-reduce.

    A rank whose measurement raised leaves ``measure`` and calls :func:`_agree_failed` with "failed": that
    all-reduce has the shape of a status check, so it meets its peers wherever they are (at their next collective's
    check, or at their own agreement). A peer that sees the failure raises :class:`_PeerMeasurementFailed` and skips
    the payload and its own agreement: every rank takes part in exactly one status all-reduce that reports the
    failure, and nobody waits in a collective another rank will never reach. Cost: one extra 1-element all-reduce
    per collective of a measurement (one per Hessian-vector product). The monitors call the collectives through the
    ``distributed`` module attribute at call time, which is what makes the swap below reach them.
    """
    if not enabled or not distributed.is_distributed():
        yield
        return
    originals = {name: getattr(distributed, name) for name in _COLLECTIVES}

    def checked(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _status_all_reduce(False, device):
                raise _PeerMeasurementFailed("The measurement failed on another rank.")
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(distributed, name, checked(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(distributed, name, original)


def report_failure(
    failure: BaseException | None, *, name: str, step: int, status_key: str, strict: bool, warned: set[str], warn_once
) -> None:
    """Warn once per kind of failure (naming the monitor, the step and the error), or raise with ``strict``.

    ``failure`` is ``None`` or a :class:`_PeerMeasurementFailed` when another rank failed; ``warn_once(key, text)``
    warns on rank 0 once (the peers' failure), ``warned`` holds the kinds of this rank's own failures already said.
    """
    if failure is None or isinstance(failure, _PeerMeasurementFailed):
        if strict:
            raise RuntimeError(
                f"{name} measurement at step {step} failed on another rank (strict=True); see that rank's error."
            ) from failure
        warn_once(
            "measurement-failed-peer",
            f"{name} measurement at step {step} failed on another rank; every rank skipped it. Training "
            f"continues; the status is logged as `{status_key}` (1 ok, 0 failed).",
        )
        return
    if strict or _is_configuration_error(failure):
        raise failure
    if isinstance(failure, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give training back the memory the failed measurement held
    kind = f"measurement-failed-{type(failure).__name__}"
    if kind in warned:
        return
    warned.add(kind)
    # every rank's own failure is reported (not rank 0's only): under DDP it may be the only one that failed
    warnings.warn(
        f"{name} measurement at step {step} failed: {type(failure).__name__}: {failure} Training continues; "
        f"the status is logged as `{status_key}` (1 ok, 0 failed), and this warning is not repeated for "
        f"this kind of error. Pass strict=True to raise instead.",
        LandscapeWarning,
        stacklevel=3,
    )
