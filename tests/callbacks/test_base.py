"""The shared machinery of every monitor: non-interference with metric states, failures, argument validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_landscape import Alert, EffectiveRankMonitor, HessianMonitor
from lightning_landscape.callbacks._base import LandscapeCallback, model_state_guard
from lightning_landscape.core._validation import LandscapeWarning
from tests.helpers.lightning import ClassifierModule, loss_of, make_trainer

torchmetrics = pytest.importorskip("torchmetrics")


class MetricModule(ClassifierModule):
    """Updates an Accuracy in training_step (the state a measurement with loss_fn=None must not touch)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(dropout=0.0, **kwargs)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        self.epoch_values: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.acc.update(logits, y)
        self.log("acc", self.acc)
        return nn.functional.cross_entropy(logits, y)

    def on_train_epoch_end(self):
        self.epoch_values.append(float(self.acc.compute()))
        self.acc.reset()


class Probe(LandscapeCallback):
    """A minimal monitor whose measurement runs the default loss (training_step) on every probe batch."""

    group = "probe"

    def __init__(self, fail_at=(), error=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_at, self.error, self.calls = set(fail_at), error or RuntimeError("boom"), 0

    def measure(self, trainer, pl_module, batches, step):
        self.calls += 1
        loss_fn = self.resolve_loss_fn(pl_module)
        total = sum(float(loss_fn(pl_module, b).detach()) for b in batches)
        if step in self.fail_at:
            raise self.error
        return {self.key("loss"): total}


def _fit(tmp_path, callbacks, max_steps=12):
    torch.manual_seed(0)
    model = MetricModule()
    make_trainer(tmp_path, callbacks, max_steps=max_steps).fit(model)
    return model


# ------------------------------------------------------------------------------------------- metric states
def test_guard_restores_torchmetrics_states_bitwise():
    model = MetricModule()
    x, y = model.x[:8], model.y[:8]
    model.acc.update(model(x), y)
    before = {name: getattr(model.acc, name).clone() for name in model.acc._defaults}
    count = model.acc._update_count
    value = float(model.acc.compute())
    with model_state_guard(model):
        for _ in range(3):
            model.acc(model(model.x[8:16]), model.y[8:16])  # forward = update + batch value
        assert model.acc._update_count == count + 3
    assert model.acc._update_count == count
    for name, saved in before.items():
        assert torch.equal(getattr(model.acc, name), saved), name
    assert float(model.acc.compute()) == value


def test_default_loss_leaves_accuracy_of_training_step_unchanged(tmp_path):
    plain = _fit(tmp_path / "plain", [])
    watched_hessian = HessianMonitor(every_n_steps=3, num_probe_batches=2, top_k=1, max_iter=5, tol=1e-1)
    watched = _fit(tmp_path / "watched", [Probe(every_n_steps=2, num_probe_batches=2), watched_hessian])
    assert watched_hessian.last_metrics["landscape/hessian/status"] == 1.0
    assert watched.acc._update_count == plain.acc._update_count
    for name in plain.acc._defaults:
        assert torch.equal(getattr(plain.acc, name), getattr(watched.acc, name)), name
    assert watched.epoch_values == plain.epoch_values
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("missing"), torch.cuda.OutOfMemoryError("oom")])
def test_measurement_failure_warns_once_logs_status_and_training_goes_on(tmp_path, error):
    probe = Probe(every_n_steps=2, num_probe_batches=1, fail_at={2, 4}, error=error)
    plain = _fit(tmp_path / "plain", [])
    with pytest.warns(LandscapeWarning, match=rf"Probe measurement at step 2 failed: {type(error).__name__}") as rec:
        model = _fit(tmp_path / "run", [probe])
    assert sum("measurement at step" in str(w.message) for w in rec) == 1  # step 4 fails again, silently
    assert probe.calls == 6  # steps 0, 2, ..., 10: every measurement ran, the failed ones included
    assert probe.last_metrics["landscape/probe/status"] == 1.0
    for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # a failed measurement changes nothing either


def test_failed_measurement_logs_status_zero(tmp_path):
    probe = Probe(every_n_steps=2, num_probe_batches=1, fail_at={10})
    with pytest.warns(LandscapeWarning, match="failed"):
        _fit(tmp_path, [probe])
    assert probe.last_metrics.keys() == {"landscape/probe/status", "landscape/probe/seconds"}
    assert probe.last_metrics["landscape/probe/status"] == 0.0


def test_strict_reraises_the_error(tmp_path):
    with pytest.raises(KeyError, match="missing"):
        _fit(
            tmp_path, [Probe(every_n_steps=2, num_probe_batches=1, fail_at={2}, error=KeyError("missing"), strict=True)]
        )


def test_keyboard_interrupt_is_not_swallowed():
    probe = Probe(num_probe_batches=1, fail_at={0}, error=KeyboardInterrupt())
    probe._probe = [(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))]
    probe._probe_by_rank = [probe._probe]
    with pytest.raises(KeyboardInterrupt):
        probe._run(make_trainer("/tmp"), ClassifierModule(), 0)


# --------------------------------------------------------------------------------------------- the loss
def test_detached_loss_fn_names_loss_fn(tmp_path):
    monitor = HessianMonitor(
        every_n_steps=2, num_probe_batches=1, loss_fn=lambda m, b: loss_of(m, b).detach(), strict=True
    )
    with pytest.raises(TypeError, match="`loss_fn` must return a loss attached to the autograd graph"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule())


def test_detached_training_step_names_training_step(tmp_path):
    class Detached(ClassifierModule):
        def training_step(self, batch, batch_idx):
            return torch.tensor(float(loss_of(self, batch)))

    monitor = HessianMonitor(every_n_steps=2, num_probe_batches=1, strict=True)
    with pytest.raises(TypeError, match=r"`training_step` \(used as the loss because `loss_fn` is None\) must return"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(Detached())


def test_detached_loss_is_fine_without_gradients(tmp_path):
    # EffectiveRankMonitor runs the loss under no_grad: a detached loss is no error there
    monitor = EffectiveRankMonitor(every_n_steps=2, num_probe_batches=1, loss_fn=lambda m, b: loss_of(m, b).detach())
    make_trainer(tmp_path, [monitor], max_steps=3).fit(ClassifierModule())
    assert monitor.last_metrics["landscape/rank/status"] == 1.0


# -------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": 10**30}, ValueError, "`seed` must be an int <= 4294967295, got 1000000000000000000000000000000"),
        ({"seed": -1}, ValueError, "`seed` must be an int >= 0, got -1"),
        ({"on_alert": lambda: None}, TypeError, "`on_alert` must be a callable taking an Alert"),
        ({"on_alert": ["warn", lambda a, b: None]}, TypeError, "`on_alert` must be a callable taking an Alert"),
        (
            {"loss_fn": lambda module: None},
            TypeError,
            r"`loss_fn` must be None or a callable \(pl_module, batch\) -> Tensor accepting 2",
        ),
    ],
)
def test_base_arguments_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Probe(**kwargs)


def test_on_alert_callables_with_defaults_or_varargs_are_accepted():
    Probe(on_alert=[print, lambda alert, extra=1: None, lambda *args: None])


def test_probe_set_larger_than_an_epoch_warns_at_train_start(tmp_path):
    probe = Probe(every_n_steps=2, num_probe_batches=20)  # 64 samples / 8 = 8 batches an epoch
    with pytest.warns(LandscapeWarning, match="`num_probe_batches`=20 is larger than an epoch"):
        make_trainer(tmp_path, [probe], max_steps=4).fit(ClassifierModule())


def test_probe_set_never_completed_warns_at_train_end(tmp_path):
    probe = Probe(every_n_steps=2, num_probe_batches=6)
    with pytest.warns(LandscapeWarning, match="never completed its probe set") as record:
        make_trainer(tmp_path, [probe], max_steps=3).fit(ClassifierModule())
    assert probe.calls == 0
    assert not any("larger than an epoch" in str(w.message) for w in record)


def test_selectors_resolved_at_setup_name_the_argument(tmp_path):
    monitor = EffectiveRankMonitor(modules="^nothing$", max_overhead=0.05)
    with pytest.raises(ValueError, match=r"`modules` must match at least one module of the model, got '\^nothing\$'"):
        make_trainer(tmp_path, [monitor], max_steps=2).fit(ClassifierModule())


def test_resume_warning_names_an_incomplete_probe_set():
    class OneProcess:
        world_size, global_rank = 1, 0

    batch = (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    saved = Probe(num_probe_batches=3)
    saved._probe = [batch]  # checkpointed after one of three probe batches
    resumed = Probe(num_probe_batches=3)
    resumed.load_state_dict(saved.state_dict())
    with pytest.warns(LandscapeWarning, match=r"holds 1 batch\(es\) per process and `num_probe_batches` is 3"):
        resumed._restore_loaded_probe(OneProcess())
    assert resumed._probe_by_rank is None  # a new probe set is captured

    class TwoProcesses(OneProcess):
        world_size = 2

    other = Probe(num_probe_batches=1)
    other.load_state_dict({**saved.state_dict(), "probe_by_rank": [[batch]]})
    with pytest.warns(LandscapeWarning, match=r"captured with 1 process\(es\) and the world size is now 2"):
        other._restore_loaded_probe(TwoProcesses())


# ------------------------------------------------------------------------------------------ alert storage
class EveryStep(Probe):
    """Fires the same alert kind at every measurement (as a NaN condition does)."""

    def measure(self, trainer, pl_module, batches, step):
        self.emit_alert(trainer, Alert(step, "non_finite", "EveryStep", "m", float("nan"), 0.0, "weights are NaN"))
        return {}


def test_an_alert_every_step_is_counted_but_stored_once_per_cooldown_window(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    monitor = EveryStep(every_n_steps=1, num_probe_batches=1, on_alert="ignore", alert_cooldown_steps=10)
    make_trainer(tmp_path, [monitor], max_steps=35, logger=logger).fit(ClassifierModule())
    assert monitor.alert_counts == {"non_finite": 35}
    assert [a.step for a in monitor.alerts] == [0, 10, 20, 30]
    assert len(monitor.state_dict()["alerts"]) == 4
    lines = (Path(logger.log_dir) / "landscape_alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 10, 20, 30]

    # a new fit into the same log directory starts the file afresh (no appending across runs)
    again = EveryStep(every_n_steps=1, num_probe_batches=1, on_alert="ignore", alert_cooldown_steps=10)
    make_trainer(tmp_path, [again], max_steps=5, logger=CSVLogger(tmp_path, name="run", version=0)).fit(
        ClassifierModule()
    )
    lines = (Path(logger.log_dir) / "landscape_alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0]


def test_stop_acts_on_a_repeat_that_is_not_stored(tmp_path):
    monitor = EveryStep(every_n_steps=1, num_probe_batches=1, on_alert="stop", alert_cooldown_steps=10, start_step=3)
    monitor._last_stored_step["non_finite"] = 0  # as if an episode had begun at step 0 and fired at step 2:
    monitor.alerting._last_alert_step[(id(monitor), "non_finite")] = 2  # step 3 continues it, inside the cooldown
    trainer = make_trainer(tmp_path, [monitor], max_steps=20)
    trainer.fit(ClassifierModule())
    assert trainer.global_step == 4 and monitor.alerts == []


def test_without_a_logger_no_alert_file_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitor = EveryStep(every_n_steps=1, num_probe_batches=1, on_alert="ignore")
    pl_trainer = make_trainer(tmp_path / "root", [monitor], max_steps=2)
    pl_trainer.fit(ClassifierModule())
    assert monitor.alerts
    assert not list(tmp_path.rglob("landscape_alerts.jsonl"))


def test_separate_alert_events_are_all_stored(tmp_path):
    class Twice(EveryStep):
        def measure(self, trainer, pl_module, batches, step):
            return super().measure(trainer, pl_module, batches, step) if step in (4, 6, 7) else {}

    monitor = Twice(every_n_steps=1, num_probe_batches=1, on_alert="ignore", alert_cooldown_steps=100)
    make_trainer(tmp_path, [monitor], max_steps=10).fit(ClassifierModule())
    assert [a.step for a in monitor.alerts] == [4, 6]  # 7 continues the event of step 6
    assert monitor.alert_counts == {"non_finite": 3}


def test_argument_errors_of_ours_raise_whatever_strict(tmp_path):
    # `loss_fn` returning a non-scalar would fail at every measurement: it is raised, not warned about
    probe = Probe(every_n_steps=2, num_probe_batches=1, loss_fn=lambda m, b: torch.ones(3))
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar Tensor"):
        _fit(tmp_path, [probe])
    # the same message raised by the user's own code is a failure like any other
    user = Probe(every_n_steps=2, num_probe_batches=1, fail_at={2}, error=ValueError("`x` must be positive"))
    with pytest.warns(LandscapeWarning, match="failed: ValueError"):
        _fit(tmp_path, [user])
