"""Overhead budget: a wall-clock ledger of the monitors' own time against the rest of training.

``max_overhead=0.05`` promises that the time spent measuring stays within 5% of the time spent training. The
ledger keeps two numbers: ``cost`` (seconds inside our measurements and per-step hooks, charged by the monitors)
and the wall time since it started. Training time is their difference, so it includes everything the user's loop
does (data loading, validation, logging), which is the time a user sees.

Scheduling is cumulative, which makes it self-correcting: a periodic measurement whose cadence is due waits until
``cost + expected_cost <= max_overhead * training_time``, with ``expected_cost`` the cost of its previous run, or
for the first run an estimate in training steps given by the monitor (``first_cost_steps``) times the mean step
time. The overhead at any moment is then at most the budget plus one measurement's cost (or the error of the first
estimate) over the training time so far. The wait is turned into a whole number of optimizer steps from the mean step
time, so that all DDP ranks can agree on it with one broadcast (see the callbacks' base); at that step the
measurement decides again, since others sharing the ledger may have spent the budget meanwhile. An owner with a
``share`` below 1 must also keep its own tally (``cost_by_owner``) within that share, so that in a shared ledger a
cheap frequent measurement cannot starve a costly one. Per-step work is charged but cannot be postponed; the
gradient monitor, the one part with per-step work of its own, reads the gradients every few steps instead when
reading them every step would exceed its share (see ``GradientSpikeMonitor``).

Wall time on CUDA is host time: kernels are asynchronous, but the measurements synchronise (Lanczos reads scalars on
the host) and the mean step time over many steps is the real throughput, so the ratio stays meaningful.
"""

from __future__ import annotations

import math
import time

from lightning_landscape.core._validation import check_float

#: Steps timed before a mean step time is trusted (the first steps include warm-up work: allocations, caches).
MIN_TIMED_STEPS = 10


class OverheadBudget:
    """Ledger of measurement cost against training time, shared by every monitor that should fit in one budget.

    Args:
        max_overhead: the allowed ratio of our time to training time (0.05 = 5%).

    Raises:
        ValueError: ``max_overhead`` is not in (0, 1].
    """

    def __init__(self, max_overhead: float) -> None:
        self.max_overhead = check_float("max_overhead", max_overhead, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.cost = 0.0
        self._started_at: float | None = None
        self._started_step = 0
        self._section_depth = 0
        # each owner's own measurement seconds: with a share below 1 an owner may spend only its share of the
        # budget, so a cheap frequent part cannot starve a costly one (nor the other way round)
        self.cost_by_owner: dict[int, float] = {}

    def start(self, step: int, now: float | None = None) -> None:
        """Start the clock at optimizer step ``step`` (only the first call counts)."""
        if self._started_at is None:
            self._started_at = time.perf_counter() if now is None else now
            self._started_step = step

    def restart(self) -> None:
        """Forget everything (a new ``fit``: the previous one's wall time says nothing about this one)."""
        self.cost = 0.0
        self._started_at = None
        self.cost_by_owner.clear()

    def charge(self, seconds: float, owner: int | None = None) -> None:
        """Add ``seconds`` of our own time (to the total only outside a :meth:`section`, which charges its whole
        span; to ``owner``'s own tally always)."""
        seconds = max(0.0, float(seconds))
        if self._section_depth == 0:
            self.cost += seconds
        if owner is not None:
            self.cost_by_owner[owner] = self.cost_by_owner.get(owner, 0.0) + seconds

    def section(self) -> _Section:
        """Charge the whole wall time of the ``with`` block once, instead of what the code inside charges.

        ``LandscapeMonitor`` wraps each hook it forwards to its parts in one section, so the ledger also sees the
        parts' bookkeeping between measurements (probe capture, cadence checks, per-step reads), not only the
        measurements themselves. (A small class rather than ``contextlib.contextmanager``: it is entered up to
        three times a step, and the generator version cost ~4 us each.)
        """
        return _Section(self)

    def training_time(self, now: float | None = None) -> float:
        """Seconds of training (wall time since the start, minus our cost)."""
        if self._started_at is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return max(0.0, now - self._started_at - self.cost)

    def overhead(self, now: float | None = None) -> float:
        """Our time over training time so far (``nan`` before any training time)."""
        training = self.training_time(now)
        return self.cost / training if training > 0 else math.nan

    def seconds_per_step(self, step: int, now: float | None = None) -> float | None:
        """Mean training seconds per optimizer step since the start; ``None`` before ``MIN_TIMED_STEPS`` steps."""
        steps = step - self._started_step
        training = self.training_time(now)
        if steps < MIN_TIMED_STEPS or training <= 0:
            return None
        return training / steps

    def steps_to_wait(
        self, expected_cost: float, step: int, now: float | None = None, owner: int | None = None, share: float = 1.0
    ) -> int:
        """Optimizer steps to wait from ``step`` before spending ``expected_cost`` seconds keeps the budget, and, for
        an ``owner`` with a ``share`` below 1, keeps its own spending within ``share`` of the budget.

        0 when it fits now. The mean step time since the start converts seconds into steps; before any step has
        been timed there is no basis for a conversion, and 0 is returned (the caller measures and learns its cost).
        """
        training = self.training_time(now)
        steps = step - self._started_step
        if steps <= 0 or training <= 0:
            return 0
        expected_cost = max(0.0, expected_cost)
        missing = (self.cost + expected_cost) / self.max_overhead - training
        if owner is not None and share < 1.0:
            own = self.cost_by_owner.get(owner, 0.0)
            missing = max(missing, (own + expected_cost) / (share * self.max_overhead) - training)
        if missing <= 0:
            return 0
        return math.ceil(missing / (training / steps))


class _Section:
    """Context manager of :meth:`OverheadBudget.section` (only the outermost section of a nest charges)."""

    __slots__ = ("_budget", "_outer", "_started")

    def __init__(self, budget: OverheadBudget) -> None:
        self._budget = budget
        self._outer = False
        self._started = 0.0

    def __enter__(self) -> None:
        if self._budget._section_depth == 0:
            self._outer = True
            self._budget._section_depth = 1
            self._started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            elapsed = time.perf_counter() - self._started
            self._budget._section_depth = 0
            self._budget.charge(elapsed)


__all__ = ["MIN_TIMED_STEPS", "OverheadBudget"]
