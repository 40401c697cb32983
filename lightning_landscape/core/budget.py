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
cheap frequent measurement cannot starve a costly one. The shares divide what the per-step work leaves
(:meth:`OverheadBudget.shared_rate`): ``reserved_per_step`` of the budget, or what that work has actually spent if
more, so that shares and per-step work together fit; a ``protected`` owner (an early warning: the logit monitor)
divides the budget less the reserve only, so that the excess is taken from the parts whose points can wait.
Per-step work is charged but cannot be postponed; the gradient monitor, the one part with per-step work of its own,
reads the gradients every few steps instead when reading them every step would exceed its share (see
``GradientSpikeMonitor``).

Planning against the run's length (``plan``): a rule that only spends what the run has already earned can never
afford a first Hessian early (a measurement of 10-80 training steps fits 5% of the training time only after
200-1,600 steps). When the run's last step is known (``Trainer(max_steps=...)`` or its estimated stepping batches),
the ledger may run ahead of the budget by the budget of ``advance_steps`` training steps (2,000 by default: 100
steps of our time at 5%), so every part's first measurement comes as soon as the probe set is complete and ten steps
are timed; the advance shrinks to nothing over the last ``advance_steps`` steps of the plan, so that at the planned
end the ledger is within ``max_overhead`` again (plus at most one measurement's estimate error, as before). The
bound at step ``s`` is ``max_overhead * (1 + advance / s)``: a run stopped early has paid for its early points. With
no known end the advance stays whole (the ledger then tends to ``max_overhead`` as the run grows). The advance is
for first points only: an owner's share is of the training time earned so far, and its first measurements (charged
with ``first=True``) are kept out of it, so that a cadence cannot spend the run's whole budget early and fall
silent, while the first measurements of every part need only the total to fit. The first points are repaid from
every share alike, pro rata over the plan, so that at the planned end firsts and shares together fit the budget.
Where the per-step work and the first points alone exceed the budget (the digits MLP at 1.3 ms steps: ~3.2% and
1.7-2.8% of a 3,000-step run), nothing more is measured after the first points and the ledger ends above it by what
they cost beyond it; per-step work cannot be postponed, and first points come before their cost is known.

Spacing: an owner whose share cannot afford its cadence would, under the cumulative rule alone, save up while a
point waits and spend the savings on the next cadence slot at once (points in pairs, then a long silence); its
scheduler therefore also waits until the share has earned one mean measurement since the previous point
(:meth:`OverheadBudget.share_seconds_per_step`, ``callbacks/_schedule.py``).

Time outside every section: reads made inside the user's training forward (forward hooks, the attention capture) are
in no hook's span; their owner charges them with ``outside_sections`` so that the total sees them.

Device time (CUDA): kernels are asynchronous, so the host time of a measurement can miss work still queued on the
device. ``MeasurementTimer`` records a CUDA event at each end of a measurement and synchronises once, on the end
event, when it stops; the measurement is charged the larger of its host span and its device span. Per-step hooks
never synchronise (they are charged their host time; their device work is a few norms). The mean step time over
many steps is the real throughput, so the ratio stays meaningful.
"""

from __future__ import annotations

import math
import time

import torch

from lightning_landscape.core._validation import check_float, check_int

#: Steps timed before a mean step time is trusted (the first steps include warm-up work: allocations, caches).
MIN_TIMED_STEPS = 10
#: Training steps whose budget the ledger may spend ahead of time (see the module docstring): at 5%, 100 steps of our
#: time, enough for a first Hessian, rank and barrier point early in a run on the reference workloads.
ADVANCE_STEPS = 2000


class OverheadBudget:
    """Ledger of measurement cost against training time, shared by every monitor that should fit in one budget.

    Args:
        max_overhead: the allowed ratio of our time to training time (0.05 = 5%).
        advance_steps: training steps whose budget may be spent ahead of time, shrinking to none at the planned end
            of the run (see :meth:`plan`); 0 spends only what the run has earned so far.

    Raises:
        ValueError: ``max_overhead`` is not in (0, 1], or ``advance_steps`` is negative.
    """

    def __init__(self, max_overhead: float, advance_steps: int = ADVANCE_STEPS) -> None:
        self.max_overhead = check_float("max_overhead", max_overhead, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.advance_steps = check_int("advance_steps", advance_steps, minimum=0)
        #: The run's last optimizer step, when known (set by :meth:`plan`); ``None``: the advance never shrinks.
        self.planned_end: int | None = None
        self.cost = 0.0
        self._started_at: float | None = None
        self._started_step = 0
        self._section_depth = 0
        # each owner's own measurement seconds: with a share below 1 an owner may spend only its share of the
        # budget, so a cheap frequent part cannot starve a costly one (nor the other way round)
        self.cost_by_owner: dict[int, float] = {}
        #: each owner's first measurements (paid by the advance; outside its share)
        self.first_cost_by_owner: dict[int, float] = {}
        #: Fraction of ``max_overhead`` kept for the per-step work beside the shares (``LandscapeMonitor``: the
        #: gradient monitor's share); what that work spends beyond it comes out of the shares (:meth:`shared_rate`).
        self.reserved_per_step = 0.0
        #: The shares of the ``protected`` owners (LandscapeMonitor: the logit monitor's), which the per-step work
        #: beyond the reserve never shrinks (:meth:`shared_rate`). Only ``LandscapeMonitor`` sets it (from its
        #: parts' weights): on a ledger shared by hand it stays 0, so the others' rate does not leave room for a
        #: protected owner's share, and with per-step work spent beside the shares the total can pass
        #: ``max_overhead`` by up to that share of the per-step work.
        self.protected_share = 0.0

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
        self.first_cost_by_owner.clear()
        self.planned_end = None

    def plan(self, end_step: float | None) -> None:
        """The optimizer step at which the run will end (``None``, ``inf`` or a negative value: unknown)."""
        if end_step is None or not math.isfinite(end_step) or end_step < 0:
            self.planned_end = None
        else:
            self.planned_end = int(end_step)

    def advance(self, step: int) -> int:
        """Training steps whose budget may be spent ahead at ``step``: ``advance_steps``, shrinking to 0 over the last
        ``advance_steps`` steps of the plan."""
        if self.planned_end is None:
            return self.advance_steps
        return max(0, min(self.advance_steps, self.planned_end - step))

    def charge(
        self, seconds: float, owner: int | None = None, first: bool = False, outside_sections: float = 0.0
    ) -> None:
        """Add ``seconds`` of our own time (to the total only outside a :meth:`section`, which charges its whole
        span; to ``owner``'s own tally always: ``cost_by_owner``, or ``first_cost_by_owner`` for a ``first``
        measurement, which the advance pays for and the owner's share does not).

        ``outside_sections``: the part of ``seconds`` spent where no section was open (reads inside the user's
        training forward, made by forward hooks): added to the total even when charged from within a section, since
        no section's span contains it.
        """
        if self._section_depth and owner is None and not outside_sections:
            return  # the open section charges its whole span (a per-step hook's charge inside LandscapeMonitor)
        seconds = max(0.0, float(seconds))
        if self._section_depth == 0:
            self.cost += seconds
        else:
            self.cost += min(seconds, max(0.0, float(outside_sections)))
        if owner is not None:
            tally = self.first_cost_by_owner if first else self.cost_by_owner
            tally[owner] = tally.get(owner, 0.0) + seconds

    def open_section(self) -> float | None:
        """Start charging a section's span (what :meth:`section` does, without a context manager object: the
        bundle's per-step hooks open one up to three times a step). Returns the start time to pass to
        :meth:`close_section`, or ``None`` inside an open section (only the outermost section charges)."""
        if self._section_depth:
            return None
        self._section_depth = 1
        return time.perf_counter()

    def close_section(self, started: float | None) -> None:
        """Charge the span of the section :meth:`open_section` returned ``started`` for (nothing if ``None``)."""
        if started is not None:
            self._section_depth = 0
            self.charge(time.perf_counter() - started)

    @property
    def in_section(self) -> bool:
        """Whether a section is open (a charge then adds to its owner's tally only: the section charges the span)."""
        return self._section_depth > 0

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

    def share_seconds_per_step(
        self, step: int, share: float, now: float | None = None, protected: bool = False
    ) -> float | None:
        """Seconds of its own budget an owner with ``share`` earns per training step at ``step``: its share of
        what the per-step work leaves of ``max_overhead`` (:meth:`shared_rate`) times the mean step time, less its
        part of the first points' repayment (see :meth:`steps_to_wait`); ``None`` before ``MIN_TIMED_STEPS`` steps
        are timed.

        (Budget saved while nothing was measured is not in this rate: spreading it over the rest of the run was
        tried, and on the fake clock the cumulative rule then still held the points back and bunched them, largest
        gap 585 and 538 steps on nanoGPT and the transformer against 472 and 493 with this rate.)
        """
        per_step = self.seconds_per_step(step, now)
        if per_step is None:
            return None
        horizon = self.planned_end - self._started_step if self.planned_end is not None else self.advance_steps
        firsts = sum(self.first_cost_by_owner.values())
        repaid = firsts / horizon if horizon > 0 and step - self._started_step < horizon else 0.0
        return share * (self.shared_rate(now, protected) * per_step - repaid)

    def unowned_cost(self) -> float:
        """Seconds of the total that no owner's tally holds: the per-step work (the hooks' bookkeeping, the probe
        capture, the gradient monitor's reads), which cannot be postponed."""
        owned = sum(self.cost_by_owner.values()) + sum(self.first_cost_by_owner.values())
        return max(0.0, self.cost - owned)

    def shared_rate(self, now: float | None = None, protected: bool = False) -> float:
        """Seconds per training second the owners' shares divide: ``max_overhead`` less what the per-step work
        takes, ``reserved_per_step`` of it or what it has spent per training second so far if more (negative when
        that alone overspends).

        Shares of all of ``max_overhead`` beside per-step work that overspends its reserve do not fit: on the
        digits MLP (a 2.5 ms step) the per-step work is ~2.7% of training against a 0.5% reserve, the cadences
        spent their shares on time, the total ran out two thirds into a 3,000-step run and nothing was measured
        after (ledger 5.4-6.3%). Where the per-step work stays within its reserve this is ``max_overhead`` less the
        reserve, the shares' budget before it existed.

        ``protected`` (an early-warning owner): ``max_overhead`` less the reserve, whatever the per-step work
        spends; the other owners' rate is then ``(max_overhead - max(spent, reserve) - p (max_overhead - reserve)) /
        (1 - p)`` with ``p`` = ``protected_share``, so that the per-step work and all shares still add up to
        ``max_overhead``. Applied to every share, the excess held the logit monitor back early in short runs,
        exactly when its alert matters (first attention-logit alert at step 199 instead of 120-127 on two high-lr
        transformers, benchmarks/early_warning.py); the curvature parts' points can wait."""
        reserve = self.reserved_per_step * self.max_overhead
        if protected:
            return self.max_overhead - reserve
        training = self.training_time(now)
        spent = self.unowned_cost() / training if training > 0 else 0.0
        # the protected shares take their part of (max_overhead - reserve) off the top; the others divide what is
        # left, renormalised, so that per-step work and all shares add up to max_overhead exactly
        kept = self.protected_share
        if kept >= 1.0:
            return self.max_overhead - max(spent, reserve)
        return (self.max_overhead - max(spent, reserve) - kept * (self.max_overhead - reserve)) / (1.0 - kept)

    def keeps_share(self, share: float) -> bool:
        """Whether an owner with ``share`` keeps its own tally within that share: a share below 1, or any share
        beside reserved per-step work (the only periodic part beside the gradient monitor has share 1 of what the
        reserve leaves, which is still less than the whole budget). A share of 1 on a ledger without a reserve is
        the whole budget, which the total's rule already keeps."""
        return share < 1.0 or self.reserved_per_step > 0.0

    def steps_to_wait(
        self,
        expected_cost: float,
        step: int,
        now: float | None = None,
        owner: int | None = None,
        share: float = 1.0,
        protected: bool = False,
    ) -> int:
        """Optimizer steps to wait from ``step`` before spending ``expected_cost`` seconds keeps the budget, and, for
        an ``owner`` whose share counts (:meth:`keeps_share`), keeps its own spending within ``share`` of what the
        per-step work leaves (:meth:`shared_rate`). ``owner=None`` checks the total alone (a first point).

        The total's budget at a step is ``max_overhead`` times the training time plus the advance (:meth:`advance`,
        in training steps at the mean step time); an owner's share is of the training time alone, so that the
        advance pays for first points (charged with ``first=True``) and not for a cadence that would spend the
        run's budget early and then fall silent. 0 when it fits now. The mean step time since the start converts
        seconds into steps; before any step has been timed there is no basis for a conversion, and 0 is returned
        (the caller measures and learns its cost). A wait that reaches past the planned end is what it would be with
        no advance left (the run will most likely end first).
        """
        training = self.training_time(now)
        steps = step - self._started_step
        if steps <= 0 or training <= 0:
            return 0
        per_step = training / steps
        expected_cost = max(0.0, expected_cost)
        wait = 0
        if owner is not None and self.keeps_share(share):
            # the first points are repaid from every share alike, pro rata over the plan (or over the advance when
            # the end is unknown), so that at the planned end firsts and shares together fit the budget
            horizon = self.planned_end - self._started_step if self.planned_end is not None else self.advance_steps
            firsts = sum(self.first_cost_by_owner.values())
            repaid = firsts * min(1.0, steps / horizon) if horizon > 0 else firsts
            own = self.cost_by_owner.get(owner, 0.0)
            # own + expected <= share * (rate * (training + w * per_step) - repaid), with rate what the per-step
            # work leaves of max_overhead (shared_rate), rate and repayment taken at their current values (decided
            # again at the date)
            rate = self.shared_rate(now, protected)
            if rate <= 0:
                wait = max(1, steps)  # the per-step work alone spends the budget: nothing fits at this rate
            else:
                missing_own = (own + expected_cost) / (share * rate) + repaid / rate - training
                wait = max(0, math.ceil(missing_own / per_step))
        # the training time (advance included) at which the total fits
        missing = (self.cost + expected_cost) / self.max_overhead - training
        if missing <= self.advance(step) * per_step:
            return wait
        # before the advance starts shrinking, each step adds one step of training time and keeps the advance whole;
        # once it shrinks, each step adds as much as the advance loses, so nothing more fits before the planned end
        total = math.ceil(missing / per_step - self.advance_steps)
        if self.planned_end is not None and step + total > self.planned_end - self.advance_steps:
            total = math.ceil(missing / per_step)
        return max(wait, total, 1)


class MeasurementTimer:
    """Seconds of one measurement: its host span, or on CUDA the larger of that and its device span.

    ``start()`` records a CUDA event on the current stream (no synchronisation); ``stop()`` records another and
    synchronises once, on it, so that work the measurement queued is paid for by the measurement and not by the
    next training step. On other devices both are the host clock.

    Args:
        device: the device the measurement runs on.
    """

    __slots__ = ("_device", "_end", "_host_started", "_start")

    def __init__(self, device: torch.device | str | None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._device = device if device.type == "cuda" and torch.cuda.is_available() else None
        self._start = self._end = None
        self._host_started = 0.0

    def start(self) -> None:
        if self._device is not None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self._device))
        self._host_started = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start` (device span included on CUDA: one synchronisation, on the end event)."""
        host = time.perf_counter() - self._host_started
        if self._start is None:
            return host
        self._end.record(torch.cuda.current_stream(self._device))
        self._end.synchronize()
        device = self._start.elapsed_time(self._end) / 1e3  # milliseconds
        self._start = self._end = None
        # the host span before the wait (not after: work the training step left queued would count) or the device
        # span from the start event, whichever is longer, is what the measurement kept training from doing
        return max(host, device)


class _Section:
    """Context manager of :meth:`OverheadBudget.section` (only the outermost section of a nest charges)."""

    __slots__ = ("_budget", "_started")

    def __init__(self, budget: OverheadBudget) -> None:
        self._budget = budget
        self._started: float | None = None

    def __enter__(self) -> None:
        self._started = self._budget.open_section()

    def __exit__(self, *exc: object) -> None:
        self._budget.close_section(self._started)


__all__ = ["ADVANCE_STEPS", "MIN_TIMED_STEPS", "MeasurementTimer", "OverheadBudget"]
