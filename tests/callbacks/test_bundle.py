import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import (
    EffectiveRankMonitor,
    GradientSpikeMonitor,
    HessianMonitor,
    LandscapeMonitor,
    LandscapeWarning,
    LogitMonitor,
    ModeConnectivityMonitor,
)
from lightning_landscape.tensorboard import dashboard_layout
from tests.helpers.lightning import ClassifierModule, make_trainer

# exact cadences (no time budget), so the steps measured do not depend on the machine's speed
FAST = {
    "hessian": {"every_n_steps": 5},
    "rank": {"every_n_steps": 5},
    "connectivity": {"every_n_steps": 5},
    "max_overhead": None,
}


def test_every_part_logs_and_the_dashboard_is_written(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="bundle")
    monitor = LandscapeMonitor(**FAST, num_probe_batches=2)
    make_trainer(tmp_path, [monitor], max_steps=11, logger=logger).fit(ClassifierModule())
    assert {type(p) for p in monitor.parts.values()} == {
        HessianMonitor,
        GradientSpikeMonitor,
        EffectiveRankMonitor,
        ModeConnectivityMonitor,
        LogitMonitor,
    }
    assert monitor.parts["logits"].num_probe_batches == 1  # its own default, not the shared 2
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for key in (
        "landscape/sharpness",
        "landscape/hessian/eos_ratio",
        "landscape/grad/norm",
        "landscape/loss/zscore",
        "landscape/rank/net.4/rankme",
        "landscape/lmc/barrier",
        "landscape/logits/output/log_partition",
    ):
        assert key in scalars, key
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert monitor.last_metrics["landscape/hessian/status"] == 1.0
    assert monitor.alerts == []


def test_parts_can_be_turned_off_and_configured():
    monitor = LandscapeMonitor(
        rank=False, connectivity=False, logits=False, hessian={"top_k": 3}, on_alert="ignore", seed=5
    )
    assert set(monitor.parts) == {"hessian", "grad_spikes"}
    assert monitor.parts["hessian"].top_k == 3
    assert monitor.parts["hessian"].every_n_steps == 200
    assert monitor.parts["grad_spikes"].on_alert == ["ignore"]
    assert monitor.parts["hessian"].seed == 5
    pickle.loads(pickle.dumps(monitor))  # ddp_spawn pickles callbacks


def test_training_is_bitwise_unchanged(tmp_path):
    def run(callbacks):
        pl.seed_everything(4)
        model = ClassifierModule(optimizer="adam", lr=0.01)
        make_trainer(tmp_path, callbacks, max_steps=60).fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    (plain, rng), (watched, rng2) = run([]), run([LandscapeMonitor(**FAST, num_probe_batches=2)])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(rng, rng2)


def test_state_round_trip_through_a_checkpoint(tmp_path):
    monitor = LandscapeMonitor(**FAST, num_probe_batches=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=7, logger=CSVLogger(tmp_path))
    trainer.fit(ClassifierModule())
    path = tmp_path / "bundle.ckpt"
    trainer.save_checkpoint(path)
    resumed = LandscapeMonitor(**FAST, num_probe_batches=2)
    make_trainer(tmp_path, [resumed], max_steps=11).fit(ClassifierModule(), ckpt_path=path)
    assert resumed.parts["connectivity"]._previous_step == 10
    assert int(resumed.parts["grad_spikes"].grad_detector.count) == 11
    assert torch.equal(resumed.parts["hessian"]._probe[0][0], monitor.parts["hessian"]._probe[0][0])
    state = copy.deepcopy(monitor.state_dict())
    # issue 14: the shared probe set is one entry of the bundle's state ("_probe"), no longer one per part
    assert set(state) == {"hessian", "grad_spikes", "rank", "connectivity", "logits", "_probe"}
    assert not any("probe_by_rank" in state[name] for name in ("hessian", "rank", "connectivity", "logits"))


def test_dashboard_layout_names_the_documented_charts():
    layout = dashboard_layout("lp")["Landscape"]
    # the sharpness the threshold applies to (the preconditioned one under Adam, issue 16): eos_sharpness
    assert layout["sharpness vs stability threshold"][1] == [
        r"lp/hessian/eos_sharpness$",
        r"lp/hessian/stability_threshold$",
    ]
    assert "alerts" in layout


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hessian": "yes"}, TypeError, "`hessian` must be True, False or a dict of HessianMonitor arguments"),
        ({"rank": {"weights": 1}}, TypeError, "`weights` must be a bool, got 1"),
        ({"num_probe_batches": 0}, ValueError, "`num_probe_batches` must be an int >= 1, got 0"),
        ({"dashboard": "no"}, TypeError, "`dashboard` must be a bool"),
        ({"max_overhead": 0.0}, ValueError, "`max_overhead` must be > 0.0, got 0.0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LandscapeMonitor(**kwargs)


def test_parts_share_one_budget_and_warn_once_without_a_logger(tmp_path):
    monitor = LandscapeMonitor(**{**FAST, "max_overhead": 0.05, "rank": {"every_n_steps": 5, "max_overhead": 0.5}})
    assert monitor.parts["hessian"].budget is monitor.budget
    assert monitor.parts["grad_spikes"].budget is monitor.budget
    assert monitor.parts["rank"].budget is not monitor.budget  # a part's own budget wins
    assert monitor.parts["rank"].budget.max_overhead == 0.5
    # the per-step gradient monitor may take 10% of the shared ledger (kept out of the shares: the ledger's
    # reserve); the periodic parts on it split what it leaves by weight (Hessian 0.8, rank 0.1, barrier 0.05,
    # logits 0.13: the headline signal and the costliest gets the most), so that everything adds up to the budget
    shares = [monitor.parts[n].budget_share for n in ("hessian", "connectivity", "logits")]
    assert shares == pytest.approx([0.8 / 0.98, 0.05 / 0.98, 0.13 / 0.98])
    assert monitor.parts["rank"].budget_share == 1.0 and monitor.parts["grad_spikes"].budget_share == 0.1
    assert sum(shares) == pytest.approx(1.0) and monitor.budget.reserved_per_step == 0.1
    # the logit part, an early warning, keeps its share whatever the per-step work overspends (taken off the top)
    assert monitor.parts["logits"].budget_protected and not monitor.parts["hessian"].budget_protected
    assert monitor.budget.protected_share == pytest.approx(0.13 / 0.98)
    alone = LandscapeMonitor(grad_spikes=False, rank=False, connectivity=False)
    assert [alone.parts[n].budget_share for n in ("hessian", "logits")] == pytest.approx([0.8 / 0.93, 0.13 / 0.93])
    assert alone.budget.reserved_per_step == 0.0  # no per-step part: nothing kept out
    # the only periodic part beside the gradient monitor has all of what the reserve leaves, and keeps to it
    only = LandscapeMonitor(rank=False, connectivity=False, logits=False)
    assert only.parts["hessian"].budget_share == 1.0 and only.budget.reserved_per_step == 0.1
    assert only.budget.keeps_share(only.parts["hessian"].budget_share)
    assert LandscapeMonitor(max_overhead=None).budget is None
    # a part's `max_overhead=None` takes it off the shared ledger: the gradient monitor then reads every step, as
    # its own stride warning promises
    exact = LandscapeMonitor(grad_spikes={"max_overhead": None})
    assert exact.parts["grad_spikes"].budget is None and exact.parts["grad_spikes"].budget_share == 1.0
    assert exact.parts["hessian"].budget is exact.budget
    assert exact.parts["hessian"].budget_share == pytest.approx(0.8 / 1.08)  # the periodic parts split it all

    quiet = LandscapeMonitor(**FAST, num_probe_batches=2)
    with pytest.warns(LandscapeWarning) as record:
        make_trainer(tmp_path, [quiet], max_steps=6, logger=False).fit(ClassifierModule())
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert quiet.last_metrics["landscape/sharpness"] > 0  # measurements go on


def test_a_model_without_linear_layers_keeps_training_with_one_warning(tmp_path):
    class ConvOnly(ClassifierModule):
        def __init__(self):
            super().__init__(batchnorm=False)
            self.net = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 5)), torch.nn.Conv1d(1, 3, 5), torch.nn.Flatten())

    monitor = LandscapeMonitor(hessian=False, rank=False, connectivity=False, max_overhead=None)
    with pytest.warns(LandscapeWarning, match="LogitMonitor found nothing to watch") as record:
        make_trainer(tmp_path, [monitor], max_steps=25).fit(ConvOnly())
    assert sum("nothing to watch" in str(w.message) for w in record) == 1
    assert monitor.parts["logits"].num_measurements == 3
