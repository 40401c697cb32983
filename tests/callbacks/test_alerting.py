"""AlertDispatcher on its own: where rescue actions may run, what the snapshot holds, the shared dispatcher of
LandscapeMonitor, and the names the base module still exports."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_landscape import LandscapeMonitor
from lightning_landscape.callbacks import _base
from lightning_landscape.callbacks._alerting import ALERT_ACTIONS, AlertDispatcher, LandscapeAlertError
from lightning_landscape.core.alerts import Alert
from tests.callbacks.rollback_helpers import ScriptedMonitor, assert_tensors_equal

pytestmark = pytest.mark.filterwarnings("ignore::lightning_landscape.core._validation.LandscapeWarning")


def fake_trainer(tmp_path, hook="on_train_batch_end", step=5, scaler=None):
    """The few Trainer attributes the dispatcher reads (one rank, no logger)."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    module._current_fx_name = hook
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # momentum buffers exist
    return SimpleNamespace(
        lightning_module=module,
        optimizers=[optimizer],
        lr_scheduler_configs=[],
        precision_plugin=SimpleNamespace(scaler=scaler),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
        global_step=step,
        is_global_zero=True,
        loggers=[],
        should_stop=False,
        world_size=1,
        save_checkpoint=lambda path: None,
    )


def alert(step=5):
    return Alert(step, "grad_spike", "ScriptedMonitor", "x", 1.0, 0.0, "scripted")


def test_nothing_is_restored_or_kept_inside_the_optimizer_closure(tmp_path):
    monitor = ScriptedMonitor(on_alert=["rollback", "ignore"])
    trainer = fake_trainer(tmp_path, hook="on_before_optimizer_step")
    monitor.alerting.log_root = tmp_path
    monitor.emit_alert(trainer, alert())
    monitor.decide_stop(trainer, True)
    assert monitor.alerting._due is not None and monitor.alerting.snapshot is None  # agreed, waiting
    assert monitor.alerting.rollbacks == 0
    trainer.lightning_module._current_fx_name = "on_train_batch_start"
    monitor.alerting.safe_point(trainer)
    assert monitor.alerting.rollbacks == 1 and monitor.alerting._due is None


def test_a_snapshot_is_not_taken_while_a_rollback_alert_is_undecided(tmp_path):
    # an emitter that has not reached its decision point yet: the snapshot point agrees on it and rolls back
    monitor = ScriptedMonitor(on_alert=["rollback", "ignore"])
    trainer = fake_trainer(tmp_path)
    keeper = monitor.alerting
    keeper.log_root = tmp_path
    keeper.safe_point(trainer)
    kept = keeper.snapshot
    assert keeper.snapshot_step == 5
    monitor.emit_alert(trainer, alert(7))
    trainer.global_step = 5 + keeper.rollback_every_n_steps
    keeper.safe_point(trainer)
    assert keeper.snapshot is kept and keeper.rollbacks == 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-15)


def test_the_snapshot_holds_the_gradient_scaler_and_restores_it_bitwise(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    monitor = ScriptedMonitor(on_alert=["rollback", "ignore"])
    trainer = fake_trainer(tmp_path, scaler=scaler)
    keeper = monitor.alerting
    keeper.log_root = tmp_path
    keeper.take_snapshot(trainer)
    saved = scaler.state_dict()
    weights = {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}
    momentum = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
    scaler.update(512.0)  # the scale changes after the snapshot
    assert scaler.get_scale() == 512.0
    with torch.no_grad():
        trainer.lightning_module.weight.add_(1.0)
    trainer.optimizers[0].state[trainer.lightning_module.weight]["momentum_buffer"].add_(1.0)
    keeper._due = [alert()]
    keeper.safe_point(trainer)
    assert scaler.state_dict() == saved
    assert_tensors_equal(trainer.lightning_module.state_dict(), weights)
    assert_tensors_equal(trainer.optimizers[0].state_dict()["state"], momentum)


def test_rollback_and_skip_notes_go_into_the_alert_file(tmp_path):
    monitor = ScriptedMonitor(on_alert=["rollback", "skip", "ignore"])
    trainer = fake_trainer(tmp_path, hook="on_before_optimizer_step", step=5)
    # the alert file is written only into a logger's directory
    trainer.loggers, trainer.ckpt_path = [SimpleNamespace(log_metrics=lambda metrics, step: None)], None
    monitor.alerting.log_root = tmp_path
    monitor.emit_alert(trainer, alert(5))
    assert all(p.grad is None for p in trainer.lightning_module.parameters())  # skipped
    trainer.lightning_module._current_fx_name = "on_train_batch_end"
    monitor.decide_stop(trainer, True)
    lines = [json.loads(line) for line in (tmp_path / "landscape_alerts.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "grad_spike"
    assert lines[1]["action"] == "rollback" and lines[1]["restored_step"] is None  # nothing kept yet


def test_landscape_monitor_shares_one_dispatcher_and_only_rollback_parts_request(tmp_path):
    monitor = LandscapeMonitor(
        hessian={"on_alert": "ignore"}, rank=False, connectivity=False, on_alert=["rollback", "ignore"]
    )
    dispatcher = monitor.alerting
    assert isinstance(dispatcher, AlertDispatcher)
    assert set(dispatcher.monitors) == {"hessian", "grad_spikes", "logits"}
    assert all(part.alerting is dispatcher for part in monitor.parts.values())
    trainer = fake_trainer(tmp_path, hook="on_train_batch_start")
    dispatcher.log_root = tmp_path
    monitor.parts["hessian"].emit_alert(trainer, alert())
    assert dispatcher._requested == []  # its own on_alert is "ignore"
    monitor.parts["logits"].emit_alert(trainer, alert())
    assert len(dispatcher._requested) == 1
    # the cooldown stays per part: the same kind from another part warns again
    assert set(dispatcher._last_alert_step) == {(id(monitor.parts["hessian"]), "grad_spike"),
                                                (id(monitor.parts["logits"]), "grad_spike")}  # fmt: skip


def test_standalone_monitor_checkpoints_its_keeper_only_with_rollback():
    assert "alerting" not in ScriptedMonitor().state_dict()
    assert "alerting" in ScriptedMonitor(on_alert="rollback").state_dict()
    assert "_alerting" not in LandscapeMonitor().state_dict()


def test_base_module_still_exports_the_alert_names():
    assert _base.LandscapeAlertError is LandscapeAlertError
    assert _base.ALERT_ACTIONS == ALERT_ACTIONS
    assert {"skip", "rollback"} <= set(ALERT_ACTIONS)


def test_skipped_step_under_a_grad_scaler_leaves_weights_and_state(tmp_path):
    # Lightning's AMP order: closure (scaled backward), unscale_, on_before_optimizer_step (the skip), scaler.step,
    # scaler.update: with no gradients left, scaler.step runs optimizer.step() on nothing
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for skip in (False, True):
        scaler.scale(module(torch.randn(4, 3)).sum()).backward()
        scaler.unscale_(optimizer)
        before = copy.deepcopy((module.state_dict(), optimizer.state_dict()))
        if skip:
            for parameter in module.parameters():
                parameter.grad = None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert_tensors_equal(module.state_dict(), before[0])
    assert_tensors_equal(optimizer.state_dict(), before[1])
