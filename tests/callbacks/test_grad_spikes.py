import copy
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape import GradientSpikeMonitor, LandscapeWarning
from lightning_landscape.callbacks._base import LandscapeAlertError
from tests.helpers.digits import DigitsModule
from tests.helpers.lightning import ClassifierModule, make_trainer


class GradNormRecorder(pl.Callback):
    """Independent twin: the global gradient norm with torch's own routine, listed before the monitor."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))


CORRUPT = (200, 500, 900)


@pytest.fixture(scope="module")
def corrupted_run(tmp_path_factory):
    """A real run on digits whose loss is multiplied by 100 at three steps (a corrupted batch)."""
    tmp_path = tmp_path_factory.mktemp("corrupt")
    pl.seed_everything(0)
    received = []
    recorder = GradNormRecorder()
    monitor = GradientSpikeMonitor(on_alert=received.append, every_n_steps=10)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=1000, logger=logger, deterministic=False)
    trainer.fit(DigitsModule(corrupt_steps=CORRUPT))
    return monitor, received, recorder, logger


def test_spikes_fire_exactly_at_the_corrupted_steps(corrupted_run):
    _, received, _, _ = corrupted_run
    assert sorted(a.step for a in received if a.kind == "grad_spike") == list(CORRUPT)
    assert sorted(a.step for a in received if a.kind == "loss_spike") == list(CORRUPT)
    assert {a.kind for a in received} == {"grad_spike", "loss_spike"}
    assert all(a.value > a.threshold == 5.0 for a in received)


def test_logged_norm_is_the_twin_of_torch_and_reads_back_from_tensorboard(corrupted_run):
    _, _, recorder, logger = corrupted_run
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    norms = {e.step: e.value for e in events.Scalars("landscape/grad/norm")}
    # Lightning's logging steps (9, 19, ...: where `self.log` lands with log_every_n_steps=10), plus the events
    assert set(range(9, 1000, 10)) <= set(norms)
    for step in (9, 19, 499, 999, *CORRUPT):
        assert norms[step] == pytest.approx(recorder.norms[step], rel=1e-5)
    sparse = events.Scalars("landscape/events/grad_spike")
    assert [e.step for e in sparse] == list(CORRUPT)
    tags = events.Tags()["scalars"]
    for key in (
        "landscape/loss/zscore",
        "landscape/grad/zscore",
        "landscape/update/norm",
        "landscape/grad/norm/net.0",
        "landscape/alerts/grad_spike",
        "landscape/loss/value",
        "landscape/update/ratio",
    ):
        assert key in tags, key
    with open(f"{logger.log_dir}/landscape_alerts.jsonl", encoding="utf-8") as handle:
        alerts = [json.loads(line) for line in handle]
    assert sorted({a["step"] for a in alerts}) == list(CORRUPT)
    assert any("alerts" in t for t in events.Tags()["tensors"])


def spy_logged(monitor):
    """Record every (step, metrics) the monitor logs."""
    logged = []
    original = monitor.log_metrics

    def log_metrics(trainer, metrics, step):
        logged.append((step, dict(metrics)))
        original(trainer, metrics, step)

    monitor.log_metrics = log_metrics
    return logged


def test_update_norm_is_the_applied_parameter_change(tmp_path):
    class Snap(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                after = list(pl_module.parameters())
                self.delta = math.sqrt(
                    sum(float((p - b).pow(2).sum()) for p, b in zip(after, self.before, strict=True))
                )
                self.norm = math.sqrt(sum(float(p.pow(2).sum()) for p in after))

    snap = Snap()
    monitor = GradientSpikeMonitor(every_n_steps=2)
    logged = spy_logged(monitor)
    make_trainer(tmp_path, [snap, monitor], max_steps=6).fit(ClassifierModule(batchnorm=False, dropout=0.0))
    at_step = dict(logged)
    assert sorted(at_step) == [1, 3, 5]  # Lightning's convention: (step + 1) % every_n_steps == 0
    assert at_step[3]["landscape/update/norm"] == pytest.approx(snap.delta, rel=1e-5)
    assert at_step[3]["landscape/update/ratio"] == pytest.approx(snap.delta / snap.norm, rel=1e-5)


def test_clip_leaves_training_bitwise_unchanged_without_spikes(tmp_path):
    def run(callbacks):
        pl.seed_everything(3)
        model = ClassifierModule()
        make_trainer(tmp_path, callbacks, max_steps=150).fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = run([])
    clipped_monitor = GradientSpikeMonitor(clip=True, warmup_steps=20)
    clipped = run([clipped_monitor])
    assert clipped_monitor.clip_count == 0
    assert all(torch.equal(plain[k], clipped[k]) for k in plain)


def test_clip_brings_a_spike_back_to_the_threshold_norm(tmp_path):
    clip_seen = {}

    class After(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 120:
                grads = [p.grad for p in pl_module.parameters()]
                clip_seen["norm"] = float(torch.nn.utils.get_total_norm(grads))

    monitor = GradientSpikeMonitor(clip=True, warmup_steps=50)
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor, After()], max_steps=130, deterministic=False).fit(
        DigitsModule(corrupt_steps=(120,))
    )
    assert monitor.clip_count == 1
    raw = monitor.grad_detector  # clipped to the norm at z = threshold of the statistics before the spike
    assert clip_seen["norm"] < 5 * math.exp(float(raw.mean))
    assert any(a.kind == "grad_spike" and a.step == 120 for a in monitor.alerts)


def test_non_finite_loss_alerts_at_once(tmp_path):
    received = []
    monitor = GradientSpikeMonitor(on_alert=received.append, warmup_steps=5)

    class NaNAt(ClassifierModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 3 else loss

    make_trainer(tmp_path, [monitor], max_steps=6).fit(NaNAt(batchnorm=False, dropout=0.0))
    non_finite = [a for a in received if a.kind == "non_finite"]
    assert non_finite[0].step == 3


def test_raise_checkpoint_and_callable_actions(tmp_path):
    monitor = GradientSpikeMonitor(on_alert="raise")
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=150, deterministic=False)
    with pytest.raises(LandscapeAlertError, match="standard deviations") as info:
        trainer.fit(DigitsModule(corrupt_steps=(100,)))
    assert info.value.alert.step == 100

    saver = GradientSpikeMonitor(on_alert="checkpoint")
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [saver], max_steps=110, deterministic=False)
    trainer.fit(DigitsModule(corrupt_steps=(100,)))
    written = sorted((tmp_path / "landscape_alerts").glob("*.ckpt"))
    assert [p.name for p in written] == ["grad_spike-step=100.ckpt", "loss_spike-step=100.ckpt"]
    resumed = make_trainer(tmp_path, [GradientSpikeMonitor()], max_steps=115, deterministic=False)
    resumed.fit(DigitsModule(), ckpt_path=str(written[0]))
    assert resumed.global_step == 115


def test_stop_stops_training(tmp_path):
    monitor = GradientSpikeMonitor(on_alert=["stop", "ignore"])
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=400, deterministic=False)
    trainer.fit(DigitsModule(corrupt_steps=(100,)))
    assert trainer.global_step <= 102


def test_state_round_trip_keeps_detector_statistics(tmp_path):
    monitor = GradientSpikeMonitor()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=80, deterministic=False)
    trainer.fit(DigitsModule())
    state = copy.deepcopy(monitor.state_dict())
    other = GradientSpikeMonitor()
    other.load_state_dict(state)
    assert torch.equal(other.grad_detector.mean, monitor.grad_detector.mean.cpu())
    assert int(other.grad_detector.count) == 80
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    resumed = GradientSpikeMonitor()
    make_trainer(tmp_path, [resumed], max_steps=81, deterministic=False).fit(DigitsModule(), ckpt_path=path)
    assert int(resumed.grad_detector.count) == 81


def test_model_untouched_without_clip(tmp_path):
    def run(callbacks):
        pl.seed_everything(5)
        model = ClassifierModule(optimizer="adam", lr=0.01)
        trainer = make_trainer(tmp_path, callbacks, max_steps=120)
        trainer.fit(model)
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    (plain, rng), (watched, rng2) = run([]), run([GradientSpikeMonitor(warmup_steps=10, every_n_steps=3)])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert torch.equal(rng, rng2)


def test_gradient_accumulation_scores_once_per_optimizer_step(tmp_path):
    monitor = GradientSpikeMonitor(warmup_steps=5)
    make_trainer(tmp_path, [monitor], max_steps=7, accumulate_grad_batches=2).fit(ClassifierModule())
    assert int(monitor.grad_detector.count) == 7
    assert int(monitor.loss_detector.count) == 7


def test_groups_argument(tmp_path):
    monitor = GradientSpikeMonitor(groups={"first": r"^net\.0\.", "weights": r"weight$"}, every_n_steps=1)
    make_trainer(tmp_path, [monitor], max_steps=2, logger=CSVLogger(tmp_path)).fit(ClassifierModule())
    assert {"landscape/grad/norm/first", "landscape/grad/norm/weights"} <= set(monitor.last_metrics)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z_threshold": 0}, ValueError, "`z_threshold` must be > 0.0, got 0.0"),
        ({"warmup_steps": 0}, ValueError, "`warmup_steps` must be an int >= 1, got 0"),
        ({"clip": "yes"}, TypeError, "`clip` must be a bool, got 'yes'"),
        ({"groups": ["a"]}, TypeError, "`groups` must be None, False or a mapping"),
        ({"groups": {"a": "("}}, ValueError, "`groups\\['a'\\]` must be a valid regular expression"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be an int >= 1, got 0"),
        ({"loss_fn": lambda m, b: 0}, TypeError, "does not take `loss_fn`"),
        ({"alert_cooldown_steps": -1}, ValueError, "`alert_cooldown_steps` must be an int >= 0, got -1"),
        ({"on_alert": "email"}, ValueError, "`on_alert` must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientSpikeMonitor(**kwargs)


def test_cooldown_suppresses_repeated_warnings(tmp_path):
    monitor = GradientSpikeMonitor(alert_cooldown_steps=1000, warmup_steps=20)
    pl.seed_everything(0)
    with pytest.warns(LandscapeWarning) as record:
        make_trainer(tmp_path, [monitor], max_steps=80, deterministic=False).fit(DigitsModule(corrupt_steps=(40, 60)))
    spikes = [a for a in monitor.alerts if a.kind == "grad_spike"]
    assert [a.step for a in spikes] == [40, 60]  # both counted and logged
    assert sum("[grad_spike]" in str(w.message) for w in record) == 1  # but warned once
    assert monitor.alert_counts["grad_spike"] == 2


def test_loss_must_be_positive_for_the_log_scale_or_configured(tmp_path):
    monitor = GradientSpikeMonitor(loss_log_scale=False, warmup_steps=5)

    class Negative(ClassifierModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) - 10.0

    make_trainer(tmp_path, [monitor], max_steps=10).fit(Negative())
    assert float(monitor.loss_detector.mean) < 0  # scored on the linear scale, negative values and all


class RampingGradients(ClassifierModule):
    """The loss (hence every gradient) is scaled by ``1.25 ** (step - start)`` from ``start`` on: a sustained rise."""

    def __init__(self, start: int | None):
        super().__init__(batchnorm=False, dropout=0.0, lr=1e-4)
        self.start = start

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        return loss * (1.25 ** (step - self.start) if self.start is not None and step >= self.start else 1.0)


def test_grad_growth_fires_on_a_sustained_rise_and_not_on_a_steady_run(tmp_path):
    def run(start):
        pl.seed_everything(0)
        alerts = []
        monitor = GradientSpikeMonitor(on_alert=alerts.append, watch_loss=False, track_update=False)
        make_trainer(tmp_path, [monitor], max_steps=300, deterministic=False).fit(RampingGradients(start))
        return [(a.step, a.kind) for a in alerts], monitor

    steady, _ = run(None)
    assert steady == []
    rising, monitor = run(200)
    kinds = [kind for _, kind in rising]
    assert kinds[0] == "grad_growth"  # before any single step is a 5-sigma spike
    assert 200 < rising[0][0] <= 210  # three steps above z = 2.5 within a few steps of the start of the rise
    assert monitor.growth_rule.patience == 3


def test_grad_growth_can_be_turned_off_and_its_streak_is_checkpointed():
    assert GradientSpikeMonitor(growth_z=None).growth_rule is None
    monitor = GradientSpikeMonitor()
    monitor.growth_rule.streak = 2
    fresh = GradientSpikeMonitor()
    fresh.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert fresh.growth_rule.streak == 2


def _force_tensor_path(monitor):
    """Make the monitor read back as on an accelerator (device values, one readback per logged step) on the CPU."""
    monitor._defer = True


def _spike_run(tmp_path, *, tensor_path=False, stride=1, clip=False, steps=300, corrupt=(121, 259)):
    pl.seed_everything(0)
    received, logged = [], {}
    monitor = GradientSpikeMonitor(on_alert=received.append, every_n_steps=10, warmup_steps=20, clip=clip)
    if tensor_path:
        _force_tensor_path(monitor)
    original = monitor.log_metrics
    monitor.log_metrics = lambda trainer, metrics, step: (
        logged.setdefault(step, {}).update(metrics),
        original(trainer, metrics, step),
    )
    module = DigitsModule(corrupt_steps=corrupt)
    make_trainer(tmp_path, [monitor, ForceStride(monitor, stride)], max_steps=steps, deterministic=False).fit(module)
    assert monitor.stride == stride
    return monitor, received, logged, module


class ForceStride(pl.Callback):
    """Sets the monitor's stride after its own `on_train_start` (which resets it for budget mode to decide)."""

    def __init__(self, monitor, stride):
        self.monitor, self.stride = monitor, stride

    def on_train_start(self, trainer, pl_module):
        self.monitor.stride = self.stride


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("stride", [1, 3])
def test_accelerator_path_decides_like_the_host_path(tmp_path, stride, clip):
    """The batched tensor path (used on GPUs) and the CPU float path give the same alerts and logged values."""
    host_monitor, host_alerts, host_logged, host_module = _spike_run(tmp_path / "host", stride=stride, clip=clip)
    _, tensor_alerts, tensor_logged, tensor_module = _spike_run(
        tmp_path / "tensor", tensor_path=True, stride=stride, clip=clip
    )
    assert not host_monitor._defer  # the host run really read back at once
    assert [(a.step, a.kind) for a in host_alerts] == [(a.step, a.kind) for a in tensor_alerts]
    assert {(a.step, a.kind) for a in host_alerts} >= {(121, "loss_spike"), (259, "loss_spike"), (259, "grad_spike")}
    assert host_logged.keys() == tensor_logged.keys()
    for step, metrics in host_logged.items():
        assert metrics.keys() == tensor_logged[step].keys(), step
        for key, value in metrics.items():
            assert value == pytest.approx(tensor_logged[step][key], rel=1e-6, abs=1e-9, nan_ok=True), (step, key)
    for a, b in zip(host_module.parameters(), tensor_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stride_reads_gradients_every_kth_step_and_scores_the_loss_every_step(tmp_path):
    _, received, logged, _ = _spike_run(tmp_path, stride=3)
    # 121 is not a multiple of 3 (its gradients were not read): the loss spike is still caught at its step
    assert (121, "loss_spike") in {(a.step, a.kind) for a in received}
    assert {a.step for a in received if a.kind == "grad_spike"} == {259}  # read: a logged step (9, 19, ...)
    grad_steps = {step for step, metrics in logged.items() if "landscape/grad/norm" in metrics}
    assert set(range(9, 300, 10)) <= grad_steps  # every logged step reads the gradients
    assert "landscape/grad/norm" not in logged[121] and "landscape/loss/zscore" in logged[121]


def _slow_reads(monitor, seconds):
    """Make reading the gradients cost `seconds` more per read step (a stand-in for a model with tiny steps)."""
    import time

    original = monitor._read_gradients

    def slow(trainer, pl_module):
        original(trainer, pl_module)
        if monitor._current is not None and monitor._current[1] is not None:
            time.sleep(seconds)

    monitor._read_gradients = slow


def test_budget_mode_reads_every_few_steps_when_reading_costs_more_than_its_share(tmp_path):
    pl.seed_everything(0)
    received = []
    monitor = GradientSpikeMonitor(on_alert=received.append, every_n_steps=10, warmup_steps=20, max_overhead=0.05)
    _slow_reads(monitor, 0.003)  # ~3 ms per read against ~1-3 ms steps: far above 5%
    logger = CSVLogger(tmp_path, name="run")
    with pytest.warns(LandscapeWarning, match=r"reads them every \d+ steps"):
        make_trainer(tmp_path, [monitor], max_steps=200, logger=logger, deterministic=False).fit(
            DigitsModule(corrupt_steps=(151,))
        )
    assert 1 < monitor.stride <= 10  # at most the logging cadence
    assert monitor._step_costs[0][1] > 0 and monitor._step_costs[1][1] > 0
    assert (151, "loss_spike") in {(a.step, a.kind) for a in received}
    rows = [r for r in csv_rows(logger) if r.get("landscape/grad/stride")]
    assert rows and max(float(r["landscape/grad/stride"]) for r in rows) > 1


def test_budget_mode_never_strides_with_clip(tmp_path):
    pl.seed_everything(0)
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=10, warmup_steps=20, max_overhead=0.05, clip=True)
    _slow_reads(monitor, 0.003)
    make_trainer(tmp_path, [monitor], max_steps=60, deterministic=False).fit(DigitsModule())
    assert monitor.stride == 1 and monitor._step_costs[0][1] == 0


def csv_rows(logger):
    import csv

    logger.save()
    with open(f"{logger.log_dir}/metrics.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class ManualSometimesLoss(DigitsModule):
    """Manual optimization whose training_step returns the loss only on even steps (and None otherwise)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss if self.global_step % 2 == 0 else None


def test_skipped_steps_without_a_loss_are_scored_without_it(tmp_path):
    # Lightning counts a manual step after optimizer.step(); a step that returned no loss has nothing to score.
    pl.seed_everything(0)
    monitor = GradientSpikeMonitor(on_alert="ignore", every_n_steps=10, warmup_steps=5)
    make_trainer(tmp_path, [monitor, ForceStride(monitor, 3)], max_steps=60, deterministic=False).fit(
        ManualSometimesLoss()
    )
    scored = int(monitor.loss_detector.state_dict()["count"])
    assert 20 <= scored <= 31  # about half of the 60 steps carried a loss, each scored once; none as non-finite
    assert "non_finite" not in monitor.alert_counts


def _stride_monitor(seen):
    return GradientSpikeMonitor(on_alert=lambda a: seen.append((a.step, a.kind)), every_n_steps=10, warmup_steps=5)


def test_losses_awaiting_scoring_survive_a_checkpoint(tmp_path):
    # stride 3: step 25 is skipped, its (corrupted) loss waits for step 27; the checkpoint after step 26 falls between
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    whole = []
    monitor = _stride_monitor(whole)
    trainer = make_trainer(tmp_path / "whole", [monitor, ForceStride(monitor, 3)], max_steps=40, deterministic=False)
    trainer.fit(DigitsModule(corrupt_steps=(25,)))
    scored = int(monitor.loss_detector.state_dict()["count"])
    assert (25, "loss_spike") in whole

    pl.seed_everything(0)
    first = _stride_monitor([])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=26, save_top_k=-1)
    callbacks = [first, ForceStride(first, 3), saver]
    trainer = make_trainer(tmp_path / "a", callbacks, max_steps=26, deterministic=False, enable_checkpointing=True)
    trainer.fit(DigitsModule(corrupt_steps=(25,)))
    assert [step for step, _ in first._monitor_state_dict()["deferred_losses"]] == []  # drained at the end
    checkpoint = next((tmp_path / "ckpt").glob("*.ckpt"))

    pl.seed_everything(0)
    resumed_alerts = []
    resumed = _stride_monitor(resumed_alerts)
    trainer = make_trainer(tmp_path / "b", [resumed, ForceStride(resumed, 3)], max_steps=40, deterministic=False)
    trainer.fit(DigitsModule(corrupt_steps=(25,)), ckpt_path=checkpoint)
    assert (25, "loss_spike") in resumed_alerts  # scored after the resume
    assert int(resumed.loss_detector.state_dict()["count"]) == scored


def test_a_new_fit_does_not_score_losses_left_by_a_failed_one(tmp_path):
    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 26:
                raise RuntimeError("interrupted")

    pl.seed_everything(0)
    seen = []
    monitor = _stride_monitor(seen)
    trainer = make_trainer(tmp_path / "a", [monitor, ForceStride(monitor, 3), Interrupt()], max_steps=40)
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(DigitsModule(corrupt_steps=(25,)))
    assert [step for step, _ in monitor._deferred_losses] == [25]
    seen.clear()
    make_trainer(tmp_path / "b", [monitor, ForceStride(monitor, 3)], max_steps=5, deterministic=False).fit(
        DigitsModule()
    )
    assert seen == []  # the old run's step 25 is not this run's
