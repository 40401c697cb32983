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
    budget = OverheadBudget(0.1, advance_steps=0)  # the rule that spends only what the run has earned
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


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_advance_steps_is_validated(bad):
    with pytest.raises((TypeError, ValueError), match="`advance_steps` must be an int"):
        OverheadBudget(0.05, advance_steps=bad)


def test_the_advance_lets_the_ledger_spend_a_run_ahead_budget_early():
    # 10 steps of 0.1 s, 0.2 s of it ours: 1 s of training. 10% of (1 s + 100 steps x 0.1 s) = 1.1 s may be spent.
    budget = OverheadBudget(0.1, advance_steps=100)
    budget.start(step=0, now=0.0)
    budget.charge(0.2)
    assert budget.advance(10) == 100  # no plan: the advance never shrinks
    assert budget.steps_to_wait(0.9, step=10, now=1.2) == 0  # 0.2 + 0.9 = 1.1 s: fits exactly
    # 1.0 s more needs (0.2 + 1.0) / 0.1 = 12 s of training and advance: 1 s + 10 s advance, so 10 steps
    assert budget.steps_to_wait(1.0, step=10, now=1.2) == 10
    # the same wait with no advance: 110 steps
    plain = OverheadBudget(0.1, advance_steps=0)
    plain.start(step=0, now=0.0)
    plain.charge(0.2)
    assert plain.steps_to_wait(1.0, step=10, now=1.2) == 110


def test_the_advance_shrinks_to_nothing_at_the_planned_end():
    budget = OverheadBudget(0.1, advance_steps=100)
    budget.plan(150)
    assert [budget.advance(s) for s in (0, 50, 100, 149, 150, 400)] == [100, 100, 50, 1, 0, 0]
    budget.start(step=0, now=0.0)
    budget.charge(0.2)
    # step 10, 1 s of training: room for 1.1 s at once (the advance is whole until step 50)
    assert budget.steps_to_wait(0.9, step=10, now=1.2) == 0
    # 1.0 s more needs (0.2 + 1.0) / 0.1 = 12 s of training and advance: 1 s + 1 s more + the whole 10 s advance at
    # step 20, before the advance starts to shrink (step 50)
    assert budget.steps_to_wait(1.0, step=10, now=1.2) == 10
    # 1.4 s more needs 16 s: from step 50 on each step adds the training time the advance loses, so the most the
    # plan affords is its 15 s; only past the planned end, with no advance left: 16 s of training, 150 steps on
    assert budget.steps_to_wait(1.4, step=10, now=1.2) == 150
    for unknown in (None, math.inf, -1):
        budget.plan(unknown)
        assert budget.planned_end is None
    budget.plan(150)
    budget.restart()  # a new fit plans again
    assert budget.planned_end is None


def test_at_the_planned_end_a_ledger_that_spent_its_advance_is_within_the_budget():
    # one 0.1 s step after another, measuring 0.5 s whenever it fits: at step 1000 (the plan) the overhead is
    # within 10% plus one measurement, however early the advance let it spend
    budget = OverheadBudget(0.1, advance_steps=300)
    budget.plan(1000)
    budget.start(step=0, now=0.0)
    now, measured = 0.0, []
    for step in range(1, 1001):
        now += 0.1
        if step >= 10 and budget.steps_to_wait(0.5, step, now=now) == 0:
            measured.append(step)
            budget.charge(0.5)
            now += 0.5
    assert measured[0] == 10  # at once: 300 steps of advance buy 3 s
    assert budget.overhead(now) <= 0.1 + 0.5 / budget.training_time(now)
    assert len(measured) == pytest.approx(100 * 0.1 / 0.5, abs=1)


@pytest.fixture
def section_clock(monkeypatch):
    """A fake clock where the ledger's sections read the time."""
    from lightning_landscape.core import budget as budget_module

    class Clock:
        now = 100.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    return clock


def test_a_section_charges_its_whole_span_once_instead_of_what_is_charged_inside(section_clock):
    clock = section_clock
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


def test_time_spent_outside_every_section_is_added_to_the_total_even_when_charged_inside_one(section_clock):
    # LogitMonitor's reads run inside the user's training forward, where no section is open; they are charged from
    # on_train_batch_end, inside the bundle's section, whose span does not contain them
    clock = section_clock
    ledger = OverheadBudget(0.05)
    ledger.start(0)
    with ledger.section():
        clock.now += 0.1  # the hook's own span
        ledger.charge(0.4, owner=1, outside_sections=0.3)  # 0.1 in this hook, 0.3 in the forward before it
    assert ledger.cost == pytest.approx(0.4)  # the section's 0.1 plus the forward's 0.3
    assert ledger.cost_by_owner[1] == pytest.approx(0.4)
    ledger.charge(0.2, outside_sections=0.2)  # outside any section: counted once
    assert ledger.cost == pytest.approx(0.6)
    with ledger.section():
        ledger.charge(0.1, outside_sections=5.0)  # never more than the charge itself
    assert ledger.cost == pytest.approx(0.7)


def test_an_owner_with_a_share_spends_at_most_that_share_of_the_budget():
    ledger = OverheadBudget(0.1, advance_steps=0)
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


def test_measurement_timer_on_cpu_is_the_host_clock(monkeypatch):
    from lightning_landscape.core import budget as budget_module

    class Clock:
        now = 5.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    timer = budget_module.MeasurementTimer("cpu")
    timer.start()
    clock.now += 0.25
    assert timer.stop() == pytest.approx(0.25)


class _FakeEvent:
    """Stands in for ``torch.cuda.Event``: the device span is set by the test, synchronisations are counted."""

    device_seconds = 0.0
    synchronized = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.recorded_on = None

    def record(self, stream=None):
        self.recorded_on = stream

    def synchronize(self):
        _FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        assert self.recorded_on is not None and end.recorded_on is not None
        return _FakeEvent.device_seconds * 1e3


@pytest.mark.parametrize(("host", "device", "charged"), [(0.1, 0.4, 0.4), (0.3, 0.05, 0.3)])
def test_measurement_timer_on_cuda_charges_the_device_span_with_one_synchronisation(monkeypatch, host, device, charged):
    # (a fake CUDA: the real path runs in benchmarks/gpu.py and in the CUDA-only test below)
    import torch

    from lightning_landscape.core import budget as budget_module

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", device))
    _FakeEvent.synchronized, _FakeEvent.device_seconds = 0, device
    timer = budget_module.MeasurementTimer(torch.device("cuda", 0))
    timer.start()
    clock.now += host
    assert timer.stop() == pytest.approx(charged)  # the longer of the host span and the device span
    assert _FakeEvent.synchronized == 1


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_measurement_timer_sees_queued_device_work():
    import torch

    from lightning_landscape.core.budget import MeasurementTimer

    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    timer = MeasurementTimer(x.device)
    timer.start()
    for _ in range(20):
        x = x @ x / 4096  # queued: the host returns at once
    seconds = timer.stop()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        x = x @ x / 4096
    end.record()
    end.synchronize()
    assert seconds >= 0.5 * start.elapsed_time(end) / 1e3


def test_shares_are_of_the_earned_time_and_first_measurements_stay_out_of_them():
    # the advance (1000 steps) lets the total spend early, but an owner's share is of the training time so far
    ledger = OverheadBudget(0.1, advance_steps=1000)
    ledger.start(0, now=0.0)
    # 10 steps of 0.1 s: 1 s of training. Half the budget of it is 0.05 s: 0.1 s more needs 2 s, 10 steps
    assert ledger.steps_to_wait(0.1, 10, now=1.0, owner=1, share=0.5) == 10
    assert ledger.steps_to_wait(0.1, 10, now=1.0, owner=1) == 0  # the whole budget: the advance pays
    ledger.charge(0.5, owner=1, first=True)  # a first measurement: the total and its own first tally
    assert ledger.cost == 0.5 and ledger.cost_by_owner == {} and ledger.first_cost_by_owner == {1: 0.5}
    # so its share is whole but for the first point's repayment (no plan: over the 1000 steps of the advance, so
    # 0.5 s * 10 / 1000 = 0.005 s by now): 0.05 s needs 0.05 / 0.05 + 0.005 / 0.1 = 1.05 s of training, 1 step on
    assert ledger.steps_to_wait(0.05, 10, now=1.5, owner=1, share=0.5) == 1
    ledger.charge(0.05, owner=1)
    assert ledger.cost_by_owner == {1: 0.05}
    ledger.restart()
    assert ledger.first_cost_by_owner == {}


def test_first_points_are_repaid_from_the_shares_pro_rata_over_the_plan():
    ledger = OverheadBudget(0.1, advance_steps=1000)
    ledger.plan(100)
    ledger.start(0, now=0.0)
    ledger.charge(0.5, owner=2, first=True)  # another part's first point, paid by the advance
    # step 10, 1 s of training: a tenth of the plan, so a tenth of the 0.5 s is repaid: owner 1's half share
    # affords 0.05 s once 0.1 * (training) - 0.05 >= 0.05 / 0.5, i.e. at 1.5 s of training: 5 steps on
    assert ledger.steps_to_wait(0.05, 10, now=1.5, owner=1, share=0.5) == 5
    # at the planned end all of it is repaid: 0.1 * 10 s - 0.5 s leaves 0.25 s for a half share, 0.2 s spent
    ledger.charge(0.2, owner=1)
    assert ledger.steps_to_wait(0.04, 100, now=10.7, owner=1, share=0.5) == 0
    # 0.06 s more needs 0.2 s more training: 2 steps
    assert ledger.steps_to_wait(0.06, 100, now=10.7, owner=1, share=0.5) == 2


def test_open_and_close_section_charge_the_outermost_span_once(section_clock):
    clock = section_clock
    ledger = OverheadBudget(0.05)
    ledger.start(0)
    assert not ledger.in_section
    outer = ledger.open_section()
    assert ledger.in_section and outer is not None
    assert ledger.open_section() is None  # nested: the outer span holds it
    clock.now += 0.25
    ledger.charge(0.25)  # per-step work inside the section, charged by nobody: the span holds it
    ledger.charge(0.1, owner=7)  # an owner's measurement: its tally, not the total
    ledger.close_section(None)  # the nested one: nothing, and the outer is still open
    assert ledger.in_section and ledger.cost == 0.0
    ledger.close_section(outer)
    assert not ledger.in_section
    assert ledger.cost == pytest.approx(0.25) and ledger.cost_by_owner == {7: pytest.approx(0.1)}


def test_the_shares_divide_what_the_per_step_work_leaves_of_the_budget():
    ledger = OverheadBudget(0.1, advance_steps=0)
    ledger.reserved_per_step = 0.2  # 2% of training kept for per-step work beside the shares
    ledger.start(0, now=0.0)
    assert ledger.shared_rate(now=0.0) == pytest.approx(0.08)  # no training time yet: the reserve
    ledger.charge(0.01)  # per-step work (no owner): 1% of the 1 s of training below, within the reserve
    ledger.charge(0.02, owner=1)  # owner 1's measurement
    assert ledger.unowned_cost() == pytest.approx(0.01)
    # 10 steps, 1.03 s of wall time, 0.03 s ours: 1 s of training; the shares divide 10% - 2%
    assert ledger.shared_rate(now=1.03) == pytest.approx(0.08)
    # more per-step work: 3% of training, beyond the reserve, so the shares get 7%
    ledger.charge(0.02)
    assert ledger.shared_rate(now=1.05) == pytest.approx(0.07)
    # owner 1 (half share) may spend 0.5 * 0.07 of the training time: 0.02 s spent, 0.05 s more needs
    # 0.07 / 0.035 = 2 s of training: 10 steps on (of the whole 10% it would need 1.4 s: 4 steps)
    assert ledger.steps_to_wait(0.05, 10, now=1.05, owner=1, share=0.5) == 10
    # earned per step: half of 7% of the 0.1 s step
    assert ledger.share_seconds_per_step(10, 0.5, now=1.05) == pytest.approx(0.5 * 0.07 * 0.1)
    # an early-warning owner (protected) keeps its share of the budget less the reserve: 0.5 * 8% of 1 s = 0.04 s,
    # so 0.038 s fits now, where an unprotected owner's half share (of 7%: 0.035 s) has to wait
    assert ledger.shared_rate(now=1.05, protected=True) == pytest.approx(0.08)
    assert ledger.steps_to_wait(0.038, 10, now=1.05, owner=2, share=0.5, protected=True) == 0
    assert ledger.steps_to_wait(0.038, 10, now=1.05, owner=2, share=0.5) > 0
    assert ledger.share_seconds_per_step(10, 0.5, now=1.05, protected=True) == pytest.approx(0.5 * 0.08 * 0.1)


def test_per_step_work_that_spends_the_whole_budget_leaves_the_shares_nothing():
    ledger = OverheadBudget(0.1, advance_steps=0)
    ledger.start(0, now=0.0)
    ledger.charge(0.2)  # per-step work alone: 20% of the 1 s of training
    assert ledger.shared_rate(now=1.2) == pytest.approx(-0.1)
    assert ledger.steps_to_wait(0.0, 10, now=1.2, owner=1, share=0.5) >= 1  # no date fits at this rate
    assert ledger.share_seconds_per_step(10, 0.5, now=1.2) < 0


def test_protected_shares_come_off_the_top_and_everything_still_adds_up_to_the_budget():
    ledger = OverheadBudget(0.1, advance_steps=0)
    ledger.reserved_per_step = 0.2  # 2% of training kept for per-step work
    ledger.protected_share = 0.25  # an early-warning part's share
    ledger.start(0, now=0.0)
    ledger.charge(0.04)  # per-step work: 4% of the 1 s of training below, 2% beyond the reserve
    now = 1.04
    protected = ledger.shared_rate(now, protected=True)
    others = ledger.shared_rate(now)
    assert protected == pytest.approx(0.08)  # the budget less the reserve, the excess notwithstanding
    # per-step work + the protected quarter of its rate + the other three quarters of theirs = the whole 10%
    assert 0.04 + 0.25 * protected + 0.75 * others == pytest.approx(0.1)
    assert others == pytest.approx((0.1 - 0.04 - 0.25 * 0.08) / 0.75)
    ledger.protected_share = 0.0  # nothing protected: the plain rule
    assert ledger.shared_rate(now) == pytest.approx(0.06)


def test_a_whole_share_beside_reserved_per_step_work_is_still_kept():
    # the only periodic part beside the gradient monitor: share 1 of what the 10% reserve leaves, i.e. 4.5% of
    # training on a 5% budget, not the whole 5% (a share of 1 used to mean "no share rule")
    ledger = OverheadBudget(0.05, advance_steps=0)
    ledger.reserved_per_step = 0.1
    ledger.start(0, now=0.0)
    ledger.charge(4.4, owner=1)
    # 100 steps, 104.4 s of wall time: 100 s of training. The total would take 0.6 s more (5 s); the owner's whole
    # share is 4.5 s, so 0.2 s more needs (4.6 / 0.045 - 100) s = 2.2 s of training: 3 steps at 1 s a step
    assert ledger.steps_to_wait(0.2, 100, now=104.4) == 0
    assert ledger.steps_to_wait(0.2, 100, now=104.4, owner=1, share=1.0) == 3
    assert ledger.keeps_share(1.0) and not OverheadBudget(0.05).keeps_share(1.0)
    alone = OverheadBudget(0.05, advance_steps=0)  # no reserve: a share of 1 is the whole budget, the total's rule
    alone.start(0, now=0.0)
    alone.charge(4.4, owner=1)
    assert alone.steps_to_wait(0.2, 100, now=104.4, owner=1, share=1.0) == 0
