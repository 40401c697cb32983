"""The scheduler of one monitor: when a measurement is due, whether the time budget lets it run now, and the DDP
agreement on that decision.

A measurement is due at optimizer step ``s`` when ``s >= start_step`` and ``(s - start_step) % every_n_steps == 0``;
a due measurement that cannot run yet (its probe set is incomplete, or budget mode postpones it) is *pending* and
runs at the first step it can. Between those steps the monitor is *idle*: :meth:`Scheduler.is_idle` is what
``LandscapeMonitor`` asks to skip a part's per-step call (the only invariant it relies on, and it lives here).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from lightning_landscape.core.budget import MIN_TIMED_STEPS, OverheadBudget

if TYPE_CHECKING:
    from lightning_landscape.callbacks._base import LandscapeCallback


def is_logging_step(step: int, every: int) -> bool:
    """Lightning's convention for the steps whose metrics it writes: ``self.log`` lands at steps 9, 19, ... for
    ``log_every_n_steps=10`` (``step`` counted from 0)."""
    return (step + 1) % max(1, every) == 0


def planned_end(trainer: pl.Trainer) -> float | None:
    """Budget mode's plan: the optimizer step at which this fit ends (``max_steps`` or the end of ``max_epochs``,
    whichever comes first), ``None`` or ``inf`` when the Trainer does not know it."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # an unsized dataloader or a strategy that cannot tell: plan without an end
        return float(trainer.max_steps) if trainer.max_steps >= 0 else None


class Scheduler:
    """Cadence and budget decisions of one monitor (``owner``: its ledger key and its ``first_cost_steps``).

    Args:
        owner: the monitor (read at decision time: ``first_cost_steps`` may be changed after construction).
        every_n_steps, start_step: the cadence.
        budget: the time ledger of budget mode (``None``: measure exactly at the cadence).

    Attributes:
        share: fraction of the budget the owner's own measurements may spend (``LandscapeMonitor`` sets it).
        idle_until: first step at which the owner has anything to do (probe complete, nothing due or pending
            before it).
    """

    def __init__(
        self, owner: LandscapeCallback, every_n_steps: int, start_step: int, budget: OverheadBudget | None
    ) -> None:
        self.owner = owner
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.budget = budget
        self.share = 1.0
        self.pending = False
        self.last_measured_step = -1
        self.idle_until = 0
        self.expected_cost: float | None = None  # seconds of the previous measurement
        self.next_allowed: int | None = None  # first step the budget allows, decided once per measurement cycle
        self.provisional = False  # next_allowed is only the step at which to decide again
        # set False by a measurement that was cheaper than the next will be (a first snapshot): budget mode then
        # estimates the next one with `first_cost_steps` instead of trusting this cost
        self.cost_is_typical = True
        # sum and count of the typical measurement costs of this fit (seconds): their mean sets the spacing
        self.typical_costs = [0.0, 0]

    # ------------------------------------------------------------------------------------------------ cadence
    def is_idle(self, step: int) -> bool:
        return step < self.idle_until

    def restart(self, trainer: pl.Trainer) -> None:
        """At the start of a fit: a fresh plan, every decision taken again."""
        if self.budget is not None:
            self.budget.restart()
            self.budget.plan(planned_end(trainer))
        self.next_allowed = None
        self.provisional = False
        self.idle_until = 0
        self.typical_costs = [0.0, 0]

    def should_measure(self, trainer: pl.Trainer, step: int, ready: bool) -> bool:
        """Whether the owner measures at ``step`` (``ready``: its probe set is complete); records the decision."""
        if step == self.last_measured_step:
            return False  # a later micro-batch of the same optimizer step (gradient accumulation)
        due = step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0
        if not (due or self.pending):
            return False
        if not ready or self._over_budget(trainer, step):
            self.pending = True
            return False
        self.pending = False
        self.last_measured_step = step
        return True

    def settle(self, step: int) -> None:
        """After ``step`` was handled (probe complete): idle until the next step at which something can happen."""
        self.idle_until = self.next_active_step(step)

    def next_active_step(self, step: int) -> int:
        """The next due step, or the date at which a postponed measurement runs or is decided again. Every rank
        computes the same from the same state, so the collective decisions of budget mode stay in lockstep."""
        if self.pending:
            # postponed by the budget: nothing happens before the date it gave (decided again, or run, there)
            return max(step + 1, self.next_allowed if self.next_allowed is not None else step + 1)
        if step < self.start_step:
            return self.start_step
        return self.start_step + ((step - self.start_step) // self.every_n_steps + 1) * self.every_n_steps

    # ------------------------------------------------------------------------------------------------- budget
    def _over_budget(self, trainer: pl.Trainer, step: int) -> bool:
        """Budget mode: whether a due measurement must wait.

        Collective when it decides: on the first due step after a measurement, and again at a provisional date
        (every rank reaches those steps, since cadence and pending state are the same on all ranks). Rank 0's clock
        decides and its decision is broadcast, so all ranks measure at the same step.
        """
        if self.budget is None:
            return False
        if self.next_allowed is None or (self.provisional and step >= self.next_allowed):
            decision = self.budget_wait(step)
            if trainer.world_size > 1:
                decision = trainer.strategy.broadcast(decision, src=0)
            wait, self.provisional = int(decision[0]), bool(decision[1])
            self.next_allowed = step + wait
        return self.provisional or step < self.next_allowed

    def budget_wait(self, step: int) -> tuple[int, bool]:
        """(steps to wait, provisional): provisional means "decide again at that step" instead of "measure then".

        Every wait is provisional: the ledger is shared, so by the date computed now other parts' measurements and
        the per-step work may have spent what this one was waiting for; it measures only when it fits at that
        moment. With a share that counts (``OverheadBudget.keeps_share``: below 1, or any beside a reserve) it also
        keeps its own spending within its share, so a cheap frequent part cannot starve a costly one. (Until
        ``MIN_TIMED_STEPS`` steps are timed there is no step time to convert a cost with.) A first measurement (or
        one after an untypical one, e.g. the barrier's snapshot) needs only the total to fit: with the ledger's
        advance (see :mod:`lightning_landscape.core.budget`) it runs as soon as its estimate fits.
        """
        if self.budget is None:
            return 0, False
        expected, share, owner = self.expected_cost, self.share, id(self.owner)
        mean = self.mean_typical_cost()
        if expected is not None and mean is not None:
            # the mean of the typical costs, not the last one: with the last, a costly point delays the next twice
            # over (its own cost is in the tally, and it is the estimate too), then a cheap one brings the one
            # after it forward; measured on nanoGPT (costs 6.6-16.5 steps), gaps of 840 steps after the costly ones
            expected = mean
        if expected is None:  # never measured: estimate the cost from the mean step time
            per_step = self.budget.seconds_per_step(step)
            if per_step is None:
                return MIN_TIMED_STEPS, True
            expected = self.owner.first_cost_steps * per_step
            # a first point needs only the total to fit (the ledger's advance pays for it early, and it is kept
            # out of the share, which spaces the later ones against the training time): no owner, no spacing
            owner, mean = None, None
        protected = self.owner.budget_protected
        wait = self.budget.steps_to_wait(expected, step, owner=owner, share=share, protected=protected)
        wait = max(wait, self._spacing_wait(step, share, mean))
        # decided again at least every `every_n_steps`: a date computed on a spent ledger (past the planned end,
        # say) must not outlive the parts' and the step time's changes
        wait = min(wait, self.every_n_steps) if wait > 0 else 0
        return wait, wait > 0

    def mean_typical_cost(self) -> float | None:
        """Mean seconds of this fit's typical measurements (``None`` before the first)."""
        total, count = self.typical_costs
        return total / count if count else None

    def _spacing_wait(self, step: int, share: float, mean: float | None) -> int:
        """Steps from ``step`` until one mean measurement's worth of the owner's share has come in since its previous
        measurement (0 with no mean yet, or when the share earns nothing: the ledger then decides alone).

        The cumulative ledger alone lets a part save up while a measurement waits and then spend it on two points
        in a row (a late point, then the next cadence slot); on a budget that cannot afford the cadence the points
        then come in bunches with long silences between. Spacing each point by the time its share takes to earn one
        measurement at the mean cost (:meth:`OverheadBudget.share_seconds_per_step`) spreads them evenly (on the
        fake clock, largest gap 683 -> 473 steps on nanoGPT, 857 -> 493 on the transformer). When the cadence is
        affordable the spacing is below ``every_n_steps`` and changes nothing.
        """
        if not self.budget.keeps_share(share) or mean is None or self.last_measured_step < 0:
            return 0
        earned = self.budget.share_seconds_per_step(step, share, protected=self.owner.budget_protected)
        if earned is None or earned <= 0:
            return 0
        spacing = math.ceil(mean / earned)
        return max(0, self.last_measured_step + spacing - step)

    def charge(self, cost: float, *, cold_first: bool = True) -> float | None:
        """Charge a measurement's ``cost`` (seconds) to the ledger and learn the next one's expected cost; returns
        the overhead so far (``None`` outside budget mode or before any training time).

        A first measurement (or the first after an untypical one) is paid by the ledger's advance, not the share.
        With ``cold_first`` the very first of a fit is cold (no warm start, fresh caches), so its cost does not
        estimate the next one, which is a first again.
        """
        if self.budget is None:
            return None
        owner = id(self.owner)
        seen = owner in self.budget.first_cost_by_owner
        self.budget.charge(cost, owner=owner, first=self.expected_cost is None)
        self.expected_cost = cost if self.cost_is_typical and (seen or not cold_first) else None
        if self.expected_cost is not None and seen:
            self.typical_costs[0] += cost
            self.typical_costs[1] += 1
        self.cost_is_typical = True
        self.next_allowed = None
        overhead = self.budget.overhead()
        return overhead if math.isfinite(overhead) else None  # nan before any training time

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "last_measured_step": self.last_measured_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = bool(state.get("pending", False))
        self.last_measured_step = int(state.get("last_measured_step", -1))
        self.idle_until = 0


__all__ = ["Scheduler", "planned_end"]
