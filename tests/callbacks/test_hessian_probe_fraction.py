"""HessianMonitor(probe_fraction=...): the operator on the first samples of each probe batch (issue 16)."""

import collections
import types
import warnings

import numpy as np
import pytest
import torch

from lightning_landscape import HessianMonitor, LandscapeMonitor, LandscapeWarning
from lightning_landscape.callbacks import _hessian_probe
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.modes import leading_samples
from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian
from tests.callbacks.test_hessian import StateRecorder, _seeded_run
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer


# ------------------------------------------------------------------------------------------- leading_samples
def test_leading_samples_cuts_every_tensor_of_the_batch_length_and_keeps_the_rest():
    Pair = collections.namedtuple("Pair", "x y")
    x, y, other = torch.arange(12.0).view(6, 2), torch.arange(6), torch.ones(3, 6)
    batch = {"pair": Pair(x, y), "list": [y, "text", 7], "other": other, "scalar": torch.tensor(1.0)}
    cut, done = leading_samples(batch, 3, 6)
    assert done
    assert isinstance(cut["pair"], Pair)
    assert torch.equal(cut["pair"].x, x[:3]) and torch.equal(cut["pair"].y, y[:3])
    assert cut["pair"].x.data_ptr() == x.data_ptr()  # a view, not a copy
    assert torch.equal(cut["list"][0], y[:3]) and cut["list"][1:] == ["text", 7]
    assert cut["other"] is other and cut["scalar"] is batch["scalar"]  # another leading dimension: kept
    tail, done = leading_samples(batch, 2, 6, start=4)
    assert done and torch.equal(tail["pair"].x, x[4:6]) and tail["list"][1:] == ["text", 7]


def test_leading_samples_rebuilds_mapping_types_and_reports_nothing_cut():
    class Encoding(collections.UserDict):  # the shape of transformers' BatchEncoding
        pass

    batch = Encoding({"input_ids": torch.zeros(4, 5, dtype=torch.long), "labels": torch.ones(4, 5)})
    cut, done = leading_samples(batch, 2, 4)
    assert done and isinstance(cut, Encoding) and cut["input_ids"].shape == (2, 5)
    assert leading_samples(batch, 4, 4) == (batch, False)  # nothing to cut
    assert leading_samples(["a", 1], 1, 4) == (["a", 1], False)


# ----------------------------------------------------------------------------------------------- twin test
def _model():
    model = ClassifierModule(batchnorm=False, dropout=0.0).double()
    model.x = model.x.double()
    return model


def test_logged_sharpness_is_the_dense_top_eigenvalue_of_the_first_half_of_the_probe(tmp_path):
    recorder = StateRecorder()
    monitor = HessianMonitor(
        top_k=2, every_n_steps=3, num_probe_batches=2, loss_fn=loss_of, tol=1e-10, probe_fraction=0.5
    )
    make_trainer(tmp_path, [recorder, monitor], max_steps=4, precision="64-true").fit(_model())
    model = _model()
    model.load_state_dict(recorder.states[3])
    halves = [(x[:4], y[:4]) for x, y in monitor._probe]  # batch_size 8 -> the first 4 samples of each batch
    with operator_mode(model, "eval"):
        expected = dense_eigvalsh(dense_hessian(model, loss_of, halves))
        whole = dense_eigvalsh(dense_hessian(model, loss_of, monitor._probe))
    logged = monitor.last_metrics
    assert logged["landscape/hessian/eig_1"] == pytest.approx(float(expected[0]), rel=1e-6)
    assert logged["landscape/hessian/eig_2"] == pytest.approx(float(expected[1]), rel=1e-6)
    assert abs(float(whole[0]) - float(expected[0])) > 1e-3 * abs(float(whole[0]))  # the cut is visible
    assert all(x.shape[0] == 8 for x, _ in monitor._probe)  # the probe set itself is whole


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_probe_fraction_keeps_training_bitwise_unchanged(tmp_path, mode):
    baseline = _seeded_run(tmp_path, [], "adam", mode_steps=30)
    monitor = HessianMonitor(mode=mode, every_n_steps=10, probe_fraction=0.5, surface=True, surface_every=1)
    monitored = _seeded_run(tmp_path, [monitor], "adam", mode_steps=30)
    assert monitor.last_metrics["landscape/hessian/status"] == 1.0  # it really measured
    for before, after in zip(baseline, monitored, strict=True):
        if isinstance(before, dict) and "state" in before:  # the optimizer's state
            for pid, state in before["state"].items():
                for name, value in state.items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][name]))
        elif isinstance(before, dict):
            assert all(torch.equal(before[k], after[k]) for k in before)
        elif isinstance(before, torch.Tensor):
            assert torch.equal(before, after)
        else:
            assert np.array_equal(np.asarray(before, dtype=object), np.asarray(after, dtype=object))


def test_an_uncuttable_batch_is_used_whole_with_one_warning(tmp_path):
    monitor = HessianMonitor(
        every_n_steps=2,
        num_probe_batches=1,
        loss_fn=loss_of,
        probe_fraction=0.5,
        batch_size_fn=lambda batch: 5,  # no tensor has leading dimension 5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=5).fit(_model())
    messages = [str(w.message) for w in caught if issubclass(w.category, LandscapeWarning)]
    assert sum("probe_fraction=0.5" in m and "used whole" in m for m in messages) == 1
    assert "landscape/sharpness" in monitor.last_metrics


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan"), "half"])
def test_probe_fraction_out_of_range_is_refused_at_construction(value):
    with pytest.raises(ValueError, match="probe_fraction"):
        HessianMonitor(probe_fraction=value)


def test_landscape_monitor_sizes_the_hessian_probe_to_the_budget_at_tol_1e_2_unless_told():
    default = LandscapeMonitor().parts["hessian"]
    assert (default.probe_fraction, default.tol) == ("auto", 1e-2)
    told = LandscapeMonitor(hessian={"probe_fraction": 1.0, "tol": 1e-3}).parts["hessian"]
    assert (told.probe_fraction, told.tol) == (1.0, 1e-3)
    assert HessianMonitor().probe_fraction == 1.0  # the monitor alone keeps the whole probe set


# ---------------------------------------------------------------------------------------------------- "auto"
def _adam_model():
    model = ClassifierModule(optimizer="adam", lr=0.01, batchnorm=False, dropout=0.0).double()
    model.x = model.x.double()
    return model


def _auto_run(tmp_path, monkeypatch, target_steps, max_overhead=1.0, steps=12, every=11, make_model=_adam_model):
    monkeypatch.setattr(_hessian_probe, "AUTO_TARGET_STEPS", target_steps)
    recorder = StateRecorder()
    monitor = HessianMonitor(
        every_n_steps=every,
        num_probe_batches=1,
        loss_fn=loss_of,
        tol=1e-10,
        probe_fraction="auto",
        max_overhead=max_overhead,
        raw_sharpness_every=1,
    )
    monitor.first_cost_steps = 0.01  # measure as soon as 10 steps are timed
    make_trainer(tmp_path, [recorder, monitor], max_steps=steps, precision="64-true").fit(make_model())
    return monitor, recorder


def _dense_top_on(recorder, step, batches):
    model = _adam_model()
    model.load_state_dict(recorder.states[step])
    with operator_mode(model, "eval"):
        return float(dense_eigvalsh(dense_hessian(model, loss_of, batches))[0])


@pytest.mark.parametrize(("target_steps", "fraction", "samples"), [(10**9, 1.0, 8), (0, 0.5, 4)])
def test_auto_picks_the_largest_fraction_that_fits_and_measures_on_it(
    tmp_path, monkeypatch, target_steps, fraction, samples
):
    monitor, recorder = _auto_run(tmp_path, monkeypatch, target_steps)
    logged = monitor.last_metrics
    assert logged["landscape/hessian/probe_fraction"] == fraction
    step = monitor.schedule.last_measured_step  # the budget waits for 10 timed steps
    probe = [(x[:samples], y[:samples]) for x, y in monitor._probe]
    assert logged["landscape/sharpness"] == pytest.approx(_dense_top_on(recorder, step, probe), rel=1e-6)
    assert monitor.state_dict()["monitor"]["probe_fraction"]["value"] == fraction


def test_auto_keeps_the_whole_batch_under_plain_sgd(tmp_path, monkeypatch):
    # SGD's edge_of_stability compares the sharpness with its threshold directly: no upward-biased half batch
    monitor, _ = _auto_run(tmp_path, monkeypatch, 0, make_model=_model)
    assert monitor.last_metrics["landscape/hessian/probe_fraction"] == 1.0
    assert monitor._probe_fraction.predicted_steps is None  # nothing was timed


def test_auto_keeps_the_whole_batch_outside_budget_mode(tmp_path, monkeypatch):
    monitor, _ = _auto_run(tmp_path, monkeypatch, 0, max_overhead=None, steps=2)
    assert monitor.last_metrics["landscape/hessian/probe_fraction"] == 1.0


def test_auto_decides_once_and_a_resumed_run_keeps_the_choice(tmp_path, monkeypatch):
    monitor, _ = _auto_run(tmp_path, monkeypatch, 0, max_overhead=1.0, steps=60, every=5)
    assert monitor.num_measurements >= 2 and monitor.last_metrics["landscape/hessian/probe_fraction"] == 0.5
    resumed = HessianMonitor(probe_fraction="auto")
    resumed.load_state_dict(monitor.state_dict())
    assert resumed._probe_fraction.value == 0.5
    fixed = HessianMonitor(probe_fraction=0.75)
    fixed.load_state_dict(monitor.state_dict())  # an explicit number wins over a checkpoint's automatic choice
    assert fixed._probe_fraction.value == 0.75


class _Clock:
    now = 0.0

    def perf_counter(self):
        return self.now


class _TimedOperator:
    """A stand-in operator whose products take ``costs[i]`` seconds on a fake clock (the last one repeats)."""

    def __init__(self, clock, costs):
        self.clock, self.costs = clock, costs
        self.shape, self.device, self.dtype, self.num_matvecs = (3, 3), torch.device("cpu"), torch.float64, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __matmul__(self, vector):
        self.clock.now += self.costs[min(self.num_matvecs, len(self.costs) - 1)]
        self.num_matvecs += 1
        return vector


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        ([0.015, 0.01], 1.0),  # 0.085 s: inside the window
        ([0.02, 0.0095], 1.0),  # 0.0865 s: inside 45% of the share, outside 40%
        ([0.03, 0.0125], 0.5),  # 0.1175 s: inside 60% of the share (the old headroom), not 45% (the digits CNN)
        ([0.015, 0.5, 0.01], 1.0),  # a hiccup on one timing product is not taken for the product's cost
        ([0.03, 0.02], 0.5),
        ([0.03, 1.0], 0.5),  # never below half a batch
    ],
)
def test_auto_rule_is_the_largest_fraction_whose_predicted_warm_cost_fits_the_headroom(monkeypatch, costs, expected):
    # window = AUTO_HEADROOM * share * max_overhead * (1 - reserved) * AUTO_TARGET_STEPS * step
    #        = 0.45 * 0.8 * 0.05 * 1 * 500 * 0.01 = 0.09 s;
    # predicted warm cost = first + (AUTO_WARM_PRODUCTS - 1) * min(second, third), times the fraction
    clock = _Clock()
    monkeypatch.setattr(_hessian_probe, "time", clock)
    budget = types.SimpleNamespace(max_overhead=0.05, reserved_per_step=0.0, seconds_per_step=lambda step: 0.01)
    operator = _TimedOperator(clock, costs)
    monitor = types.SimpleNamespace(
        budget=budget, budget_share=0.8, mode="eval", seed=0, _operator=lambda *args: operator
    )
    fraction, spent = _hessian_probe.ProbeFraction("auto")._decide(
        monitor, types.SimpleNamespace(world_size=1), ClassifierModule(), [], {}, 0
    )
    assert (fraction, spent) == (expected, 3)
