import math

import pytest

from lightning_landscape.core.budget import OverheadBudget


def test_ledger_separates_our_time_from_training_time():
    budget = OverheadBudget(0.1)
    assert budget.training_time(5.0) == 0.0 and math.isnan(budget.overhead(5.0))
    budget.start(step=0, now=10.0)
    budget.start(step=3, now=99.0)  # only the first start counts
    budget.charge(0.5)
    budget.charge(-1.0)  # a negative duration (clock adjustments) is ignored
    assert budget.training_time(now=12.5) == pytest.approx(2.0)
    assert budget.overhead(now=12.5) == pytest.approx(0.25)
    budget.restart()
    assert budget.cost == 0.0 and budget.training_time(now=50.0) == 0.0


def test_steps_to_wait_pays_back_the_expected_cost_at_the_mean_step_time():
    budget = OverheadBudget(0.1)
    budget.start(step=0, now=0.0)
    assert budget.steps_to_wait(1.0, step=0, now=0.0) == 0  # no step timed yet: nothing to convert with
    budget.charge(0.2)
    # 10 steps in 1.2 s of wall time, 0.2 s of it ours: 1.0 s of training, 0.1 s a step.
    # Spending 0.2 s more needs (0.2 + 0.2) / 0.1 = 4 s of training: 3 s more = 30 steps.
    assert budget.steps_to_wait(0.2, step=10, now=1.2) == 30
    # after those 30 steps it fits
    assert budget.steps_to_wait(0.2, step=40, now=4.2) == 0
    # a cheap measurement fits sooner
    assert budget.steps_to_wait(0.0, step=10, now=1.2) == 10


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_max_overhead_is_validated(bad):
    with pytest.raises(ValueError, match="max_overhead"):
        OverheadBudget(bad)


def test_a_section_charges_its_whole_span_once_instead_of_what_is_charged_inside(monkeypatch):
    from lightning_landscape.core import budget as budget_module

    class Clock:
        now = 100.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    ledger = OverheadBudget(0.05)
    ledger.start(0)
    with ledger.section():
        clock.now += 0.3  # bookkeeping nobody charges
        ledger.charge(0.2)  # a part's own measurement, inside the section: not counted twice
        with ledger.section():  # nested: part of the outer span
            clock.now += 0.2
    assert ledger.cost == pytest.approx(0.5)
    ledger.charge(0.1)  # outside any section, charges count again
    assert ledger.cost == pytest.approx(0.6)


def test_an_owner_with_a_share_spends_at_most_that_share_of_the_budget():
    ledger = OverheadBudget(0.1)
    ledger.start(0, now=0.0)
    # 10 steps of 0.1 s: 1 s of training, room for 0.1 s in all
    assert ledger.steps_to_wait(0.1, 10, now=1.0, owner=1, share=0.5) == 10  # half the budget: needs 2 s
    assert ledger.steps_to_wait(0.1, 10, now=1.0, owner=1) == 0  # the whole budget
    ledger.charge(0.05, owner=2)
    assert ledger.cost_by_owner == {2: 0.05}
    # owner 1 has spent nothing of its share, but the total (0.05 + 0.05) decides: 1 s of training is enough
    assert ledger.steps_to_wait(0.05, 10, now=1.05, owner=1, share=0.5) == 0
    with ledger.section():
        ledger.charge(0.3, owner=1)  # inside a section: the owner's tally counts, the total waits for the section
    assert ledger.cost_by_owner[1] == 0.3
    ledger.restart()
    assert ledger.cost_by_owner == {}
