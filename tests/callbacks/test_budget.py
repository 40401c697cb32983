"""Budget mode on a fake clock: each training step takes 10 ms, each measurement 100 ms (no real timing)."""

import itertools

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_landscape.callbacks import _measure
from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core import budget as budget_module
from tests.helpers.lightning import ClassifierModule, make_trainer

STEP_SECONDS = 0.01
MEASUREMENT_SECONDS = 0.1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class CostlyMonitor(LandscapeCallback):
    group = "costly"
    first_cost_steps = MEASUREMENT_SECONDS / STEP_SECONDS  # an exact first estimate

    def __init__(self, clock: FakeClock, advance_steps: int = 0, **kwargs) -> None:
        super().__init__(num_probe_batches=1, **kwargs)
        if self.budget is not None:
            # 0: the rule that spends only what the run has earned, which the tests below check exactly; the
            # advance (the default, see core.budget) has its own tests
            self.budget.advance_steps = advance_steps
        self.clock = clock
        self.measured: list[tuple[int, float, float]] = []  # step, cost and training time before it

    def measure(self, trainer, pl_module, batches, step):
        ledger = self.budget
        self.measured.append((step, ledger.cost if ledger else 0.0, ledger.training_time() if ledger else 0.0))
        self.clock.now += MEASUREMENT_SECONDS
        return {}


class Ticker(Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += STEP_SECONDS


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(_measure, "time", fake)  # where a measurement is timed
    monkeypatch.setattr(budget_module, "time", fake)
    return fake


@pytest.mark.parametrize("max_overhead", [0.05, 0.2])
def test_measurements_are_spaced_to_keep_the_budget(tmp_path, clock, max_overhead):
    monitor = CostlyMonitor(clock, every_n_steps=1, max_overhead=max_overhead)
    make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=1000).fit(ClassifierModule())
    steps = [s for s, _, _ in monitor.measured]
    # the first waits until its estimated cost fits: 100 ms at 5% needs 2 s of training (200 steps)
    assert abs(steps[0] - MEASUREMENT_SECONDS / max_overhead / STEP_SECONDS) <= 1
    # each one starts only when the ledger, including its own expected cost, fits the budget
    for _, cost, training in monitor.measured:
        assert cost + MEASUREMENT_SECONDS <= max_overhead * training + 1e-9
    # ... and not much later than needed: the budget of 1000 steps of 10 ms buys this many 100 ms measurements
    expected = 1000 * STEP_SECONDS * max_overhead / MEASUREMENT_SECONDS
    assert expected - 1 <= len(steps) <= expected + 1
    assert monitor.budget.overhead() <= max_overhead + MEASUREMENT_SECONDS / monitor.budget.training_time()
    assert monitor.last_metrics["landscape/costly/seconds"] == pytest.approx(MEASUREMENT_SECONDS)
    assert monitor.last_metrics["landscape/budget/overhead"] <= max_overhead + 1e-9


def test_without_a_budget_the_cadence_is_exact(tmp_path, clock):
    monitor = CostlyMonitor(clock, every_n_steps=7)
    make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=30).fit(ClassifierModule())
    assert [s for s, _, _ in monitor.measured] == [0, 7, 14, 21, 28]
    assert monitor.budget is None and "landscape/budget/overhead" not in monitor.last_metrics


def test_max_overhead_is_validated():
    with pytest.raises(ValueError, match="`max_overhead` must be <= 1.0, got 2.0"):
        CostlyMonitor(FakeClock(), max_overhead=2.0)


def test_parts_sharing_one_ledger_each_measure_only_when_they_fit_at_that_moment(tmp_path, clock):
    # A cheap part (10 ms, every step) and a costly one (100 ms) share a 5% ledger. The costly one's date is decided
    # early; by then the cheap one has spent budget too, so the date must be re-checked, not trusted; and with equal
    # shares the cheap one, which could measure every 20 steps, cannot starve the costly one.
    from lightning_landscape.core.budget import OverheadBudget

    class Cheap(CostlyMonitor):
        group = "cheap"
        first_cost_steps = 1.0

        def measure(self, trainer, pl_module, batches, step):
            ledger = self.budget
            self.measured.append((step, ledger.cost, ledger.training_time()))
            self.clock.now += 0.01
            return {}

    ledger = OverheadBudget(0.05, advance_steps=0)
    costly = CostlyMonitor(clock, every_n_steps=1, max_overhead=0.05, prefix="a")
    cheap = Cheap(clock, every_n_steps=1, max_overhead=0.05, prefix="b")
    costly.budget = cheap.budget = ledger
    costly.budget_share = cheap.budget_share = 0.5  # what LandscapeMonitor does for its periodic parts
    make_trainer(tmp_path, [costly, cheap, Ticker(clock)], max_steps=1000).fit(ClassifierModule())
    assert costly.measured and cheap.measured
    for _, cost, training in costly.measured:
        assert cost + MEASUREMENT_SECONDS <= 0.05 * training + 1e-9
    for _, cost, training in cheap.measured:
        assert cost + 0.01 <= 0.05 * training + 1e-9
    assert ledger.overhead() <= 0.05 + MEASUREMENT_SECONDS / ledger.training_time()
    spent = [ledger.cost_by_owner.get(id(part), 0.0) for part in (costly, cheap)]
    assert max(spent) <= 0.025 * ledger.training_time() + MEASUREMENT_SECONDS  # each within its half


class NeverIdle(CostlyMonitor):
    """The same monitor without the idle skip: its batch-start hook does its checks at every step."""

    def _next_active_step(self, step):
        return step


@pytest.mark.parametrize(
    ("every_n_steps", "max_overhead", "start_step", "advance"),
    [(1, 0.05, 0, 0), (7, 0.05, 3, 0), (25, 0.2, 0, 0), (1, 0.05, 0, 300)],
)
def test_idle_skip_never_changes_when_measurements_run(
    tmp_path, clock, every_n_steps, max_overhead, start_step, advance
):
    # Parts skip their per-step checks until their next due step or postponed date (the bundle does not even call
    # them); the steps at which they measure must be exactly those of checking at every step.
    measured = {}
    for kind in (CostlyMonitor, NeverIdle):
        clock.now = 1000.0
        monitor = kind(
            clock, every_n_steps=every_n_steps, max_overhead=max_overhead, start_step=start_step, advance_steps=advance
        )
        make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=450).fit(ClassifierModule())
        measured[kind] = [s for s, _, _ in monitor.measured]
    assert len(measured[CostlyMonitor]) >= 2
    assert measured[CostlyMonitor] == measured[NeverIdle]
    skipping = CostlyMonitor(clock, every_n_steps=every_n_steps, max_overhead=max_overhead, start_step=start_step)
    make_trainer(tmp_path, [skipping, Ticker(clock)], max_steps=50).fit(ClassifierModule())
    assert skipping.idle_until > 49  # it really idles between its dates


def test_with_the_advance_the_first_measurement_comes_early_and_the_planned_end_keeps_the_budget(tmp_path, clock):
    # 300 steps of 10 ms at 5% buy 150 ms ahead: the first 100 ms measurement runs once ten steps are timed (step
    # 10, not 200), and the advance shrinks over the plan's last 300 steps so that at step 1000 the ledger is within
    # 5% plus one measurement again
    monitor = CostlyMonitor(clock, every_n_steps=1, max_overhead=0.05, advance_steps=300)
    make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=1000).fit(ClassifierModule())
    steps = [s for s, _, _ in monitor.measured]
    assert steps[0] == 10
    assert monitor.budget.planned_end == 1000
    for step, cost, training in monitor.measured:
        advance = min(300, 1000 - step) * training / step
        assert cost + MEASUREMENT_SECONDS <= 0.05 * (training + advance) + 1e-9
    assert len(steps) == pytest.approx(1000 * STEP_SECONDS * 0.05 / MEASUREMENT_SECONDS, abs=1)
    assert monitor.budget.overhead() <= 0.05 + MEASUREMENT_SECONDS / monitor.budget.training_time()


def test_the_plan_is_the_trainers_end_and_unknown_without_one(tmp_path, clock):
    monitor = CostlyMonitor(clock, every_n_steps=5, max_overhead=0.05, advance_steps=10)
    make_trainer(tmp_path, [monitor], max_steps=-1, max_epochs=2).fit(ClassifierModule())
    assert monitor.budget.planned_end == 16  # 2 epochs of 8 batches

    class Endless(ClassifierModule):
        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(self.x, self.y)

            class Stream(torch.utils.data.IterableDataset):
                def __iter__(self):
                    yield from iter(data)

            return torch.utils.data.DataLoader(Stream(), batch_size=8)

    monitor = CostlyMonitor(clock, every_n_steps=5, max_overhead=0.05, advance_steps=10)
    make_trainer(tmp_path, [monitor], max_steps=-1, max_epochs=1).fit(Endless())
    assert monitor.budget.planned_end is None


#: Costs in training steps of the bundle's parts as configured by LandscapeMonitor (one probe batch for the Hessian
#: and the barrier), with the warm Lanczos near its floor (issue 16: top-1 floor 9/25/26 steps on four probe batches
#: on the MLP/CNN/transformer, a quarter of that on one batch where the batch dominates): a cold Hessian costs more
#: than a warm one; the barrier's first measurement is only a snapshot.
BUNDLE_COSTS = {"hessian": (15.0, 6.0), "rank": (5.0, 5.0), "connectivity": (0.1, 10.0), "logits": (0.3, 0.3)}
#: The gradient monitor's per-step work, in training steps (1%: the CNN's 0.5% reading every step, with margin).
PER_STEP_COST = 0.01


def fake_bundle_costs(monitor, clock):
    """Replace each periodic part's measurement by one that costs BUNDLE_COSTS on the fake clock, and add the
    gradient monitor's per-step work; returns the steps at which each part measured."""
    measured = {name: [] for name in BUNDLE_COSTS}
    for name, (first, later) in BUNDLE_COSTS.items():
        part = monitor.parts[name]

        def measure(trainer, pl_module, batches, step, name=name, part=part, first=first, later=later):
            if not measured[name] and name == "connectivity":
                part._cost_is_typical = False  # as the real one: a snapshot says nothing of an interpolation's cost
            clock.now += (later if measured[name] else first) * STEP_SECONDS
            measured[name].append(step)
            return {}

        part.measure = measure
    spikes = monitor.parts["grad_spikes"]
    original = spikes.on_train_batch_end

    def per_step_work(*args):
        original(*args)
        clock.now += PER_STEP_COST * STEP_SECONDS

    spikes.on_train_batch_end = per_step_work
    return measured


@pytest.mark.slow
def test_landscape_monitor_defaults_give_early_points_then_sharpness_every_500_steps(tmp_path, clock, monkeypatch):
    # LandscapeMonitor() exactly as a user writes it, with each part costing what it costs on the reference
    # workloads (BUNDLE_COSTS): the empty dashboard becomes a curve within the 5% budget
    from lightning_landscape import LandscapeMonitor, LandscapeWarning
    from lightning_landscape.callbacks import grad_spikes as grad_spikes_module

    monkeypatch.setattr(grad_spikes_module, "time", clock)
    # 3,000 steps: the per-step work (PER_STEP_COST, 1%) is twice the gradient monitor's reserve, and the excess
    # comes out of the curvature parts' shares, so the rank's share pays for its second 5-step point at ~1,900
    steps = 3000
    monitor = LandscapeMonitor(on_alert="ignore")
    measured = fake_bundle_costs(monitor, clock)
    with pytest.warns(LandscapeWarning, match="no logger"):
        make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=steps).fit(ClassifierModule())
    # a first sharpness and rank point, and a first barrier (the snapshot's successor), within a few hundred steps
    assert measured["hessian"][0] <= 50 and measured["rank"][0] <= 50
    assert len(measured["connectivity"]) >= 2 and measured["connectivity"][1] <= 300
    # then sharpness at least every 500 steps, to the end of the run
    hessian = measured["hessian"]
    assert max(b - a for a, b in zip(hessian, [*hessian[1:], steps], strict=True)) <= 500
    # ... within the budget at the planned end (plus at most one measurement's cost, as the rule promises)
    ledger = monitor.budget
    assert ledger.overhead() <= 0.05 + max(c for pair in BUNDLE_COSTS.values() for c in pair) * STEP_SECONDS / (
        ledger.training_time()
    )
    # the others keep their points too (LogitMonitor reads the training forward, not `measure`: count its readings)
    logits = len(measured["logits"]) or monitor.parts["logits"].num_measurements
    assert len(measured["rank"]) >= 2 and logits >= 10


def test_logit_reads_inside_the_training_forward_are_charged_to_the_shared_ledger(tmp_path, clock, monkeypatch):
    # LogitMonitor reads the output logits in a forward hook, inside the user's training step, where the bundle's
    # sections (which time its callback hooks) are all closed: the ledger's total must still see that time
    from lightning_landscape import LandscapeMonitor
    from lightning_landscape.callbacks import _logit_capture, logits

    read_seconds = 0.002  # a fifth of a training step
    saturated = _logit_capture.softmax_saturated

    def slow_read(*args, **kwargs):
        clock.now += read_seconds
        return saturated(*args, **kwargs)

    monkeypatch.setattr(_logit_capture, "time", clock)
    monkeypatch.setattr(logits, "time", clock)
    monkeypatch.setattr(_logit_capture, "softmax_saturated", slow_read)
    monitor = LandscapeMonitor(
        hessian=False,
        rank=False,
        connectivity=False,
        grad_spikes=False,
        logits={"every_n_steps": 10},
        on_alert="ignore",
        max_overhead=1.0,
    )
    make_trainer(tmp_path, [monitor, Ticker(clock)], max_steps=60).fit(ClassifierModule())
    part = monitor.parts["logits"]
    measured = part.num_measurements
    assert measured >= 2
    tally = monitor.budget.cost_by_owner.get(id(part), 0.0) + monitor.budget.first_cost_by_owner.get(id(part), 0.0)
    # (a little real time leaks in through clocks this test does not fake: microseconds)
    assert tally == pytest.approx(measured * read_seconds, rel=0.05)
    assert monitor.budget.cost == pytest.approx(tally, rel=0.05)


@pytest.mark.parametrize(("share", "reserved"), [(0.9, 0.0), (1.0, 0.1)])
def test_a_part_that_cannot_afford_its_cadence_gets_evenly_spaced_points(tmp_path, clock, share, reserved):
    # (share 1 beside a 10% reserve: the only periodic part beside the gradient monitor, 90% of the ledger too)
    # Measurements costing 40, 160, 40, 160, ... ms (mean 100), 10 ms steps, 90% of a 5% ledger: the share earns one
    # mean measurement per ~300 steps (90% of 5% of 10 ms a step, less its part of the first points' repayment over
    # the 3,000-step plan), far from the 50-step cadence. Without the spacing the cumulative ledger measures as soon
    # as the previous cost fits: a cheap point right after a costly one, then a long silence; with it, every gap is
    # about the earning time of a mean measurement.
    from lightning_landscape.core.budget import OverheadBudget

    class Uneven(CostlyMonitor):
        def measure(self, trainer, pl_module, batches, step):
            self.measured.append((step, self.budget.cost, self.budget.training_time()))
            self.clock.now += (0.04, 0.16)[len(self.measured) % 2]
            return {}

    ledger = OverheadBudget(0.05, advance_steps=0)
    ledger.reserved_per_step = reserved
    uneven = Uneven(clock, every_n_steps=50, max_overhead=0.05)
    uneven.budget = ledger
    uneven.budget_share = share
    make_trainer(tmp_path, [uneven, Ticker(clock)], max_steps=3000).fit(ClassifierModule())
    steps = [s for s, _, _ in uneven.measured]
    firsts = ledger.first_cost_by_owner[id(uneven)]
    earning = MEASUREMENT_SECONDS / (0.9 * (0.05 * STEP_SECONDS - firsts / 3000))
    # (after the first warm points: the mean cost the spacing uses settles as 40 and 160 alternate)
    warm_gaps = [b - a for a, b in itertools.pairwise(steps[3:])]
    assert len(warm_gaps) >= 6
    assert min(warm_gaps) >= 0.75 * earning
    assert max(warm_gaps) <= 1.25 * earning + 50  # the next decision comes at most one cadence later
    assert ledger.overhead() <= 0.05 + 0.16 / ledger.training_time()


@pytest.mark.parametrize("first_is_cold", [True, False])
def test_only_a_cold_first_measurement_makes_the_second_one_a_first_too(tmp_path, clock, first_is_cold):
    # the Hessian's first Lanczos has no warm start, so its cost says nothing about the next one, which is paid like
    # a first (by the ledger's advance); the rank has no warm start at all, so its second point is paid from its share
    class Part(CostlyMonitor):
        pass

    Part.first_is_cold = first_is_cold
    part = Part(clock, every_n_steps=50, max_overhead=0.5, advance_steps=2000)
    make_trainer(tmp_path, [part, Ticker(clock)], max_steps=60).fit(ClassifierModule())
    assert [s for s, _, _ in part.measured] == [10, 50]
    firsts = part.budget.first_cost_by_owner[id(part)]
    assert firsts == pytest.approx(2 * MEASUREMENT_SECONDS if first_is_cold else MEASUREMENT_SECONDS)
    assert part.budget.cost_by_owner.get(id(part), 0.0) == pytest.approx(0.0 if first_is_cold else MEASUREMENT_SECONDS)
    from lightning_landscape import EffectiveRankMonitor, HessianMonitor

    assert HessianMonitor.first_is_cold and not EffectiveRankMonitor.first_is_cold
