"""on_alert="rollback" and "skip": bitwise restores of the snapshot, the learning-rate cut under schedulers, the
bound, resume, and the shared keeper of LandscapeMonitor."""

import copy
import json
import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_landscape import LandscapeMonitor
from lightning_landscape.callbacks._alerting import scale_learning_rates
from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core._validation import LandscapeWarning
from tests.callbacks.rollback_helpers import Recorder, Regression, ScriptedMonitor, assert_tensors_equal, trainer_for

ROLLBACK = ["rollback", "ignore"]


def spy_logged(monitor):
    logged = []
    monitor.log_metrics = lambda trainer, metrics, step: logged.append((step, dict(metrics)))
    return logged


def jsonl(tmp_path):
    # written into the logger's directory (tmp_path itself: `run` gives the Trainer a CSVLogger with no subfolders)
    path = tmp_path / "landscape_alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(tmp_path, monitor, max_steps=20, module=None, ckpt_path=None):
    before, after = Recorder(), Recorder()
    # a logger, because the alert file is only written into a logger's directory
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = trainer_for(tmp_path, [before, monitor, after], max_steps=max_steps, logger=logger)
    trainer.fit(module or Regression(), ckpt_path=ckpt_path)
    return trainer, before, after


def test_rollback_restores_the_snapshot_bitwise_and_cuts_the_learning_rate(tmp_path):
    # snapshots at steps 1, 6, 11 (every 5, at the safe point after each healthy step); the alert raised at step 12
    # before the optimizer step is decided at that step's end (global step 13), which restores step 11's state
    monitor = ScriptedMonitor(alert_steps={12}, on_alert=ROLLBACK, rollback_every_n_steps=5)
    logged = spy_logged(monitor)
    with pytest.warns(LandscapeWarning, match=r"step 13: rolled back to step 11, lr x0\.5 \(rollback 1 of 3\) after "):
        trainer, before, after = run(tmp_path, monitor)
    restored, snapshot = after.states[13], before.states[11]
    assert_tensors_equal(restored["model"], snapshot["model"])  # parameters and BatchNorm buffers
    assert_tensors_equal(restored["optimizer"]["state"], snapshot["optimizer"]["state"])  # Adam moments, step count
    assert restored["lr"] == snapshot["lr"] * 0.5
    scheduler = restored["schedulers"][0]
    assert scheduler["last_epoch"] == snapshot["schedulers"][0]["last_epoch"] == 11
    assert scheduler["base_lrs"] == [lr * 0.5 for lr in snapshot["schedulers"][0]["base_lrs"]]
    # the monitor's own state came back too (one tick a step: 11 at the snapshot, 7 more steps after the rollback)
    assert monitor.ticks == 11 + (20 - 13)
    assert monitor.alerting.rollbacks == 1
    assert (13, {"landscape/rollbacks": 1.0}) in logged
    assert [a.step for a in monitor.alerts] == [12]  # the alert history is kept across the rollback
    records = jsonl(tmp_path)
    assert records[1] == {
        "step": 13,
        "action": "rollback",
        "restored_step": 11,
        "lr_factor": 0.5,
        "rollbacks": 1,
        "alerts": "grad_spike at step 12",
    }
    # the learning-rate cut survives LambdaLR, which recomputes lr from base_lrs every step: 18 scheduler steps at the
    # end (11 before the snapshot, 7 after the rollback)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.97**18 * 0.5, rel=1e-12)
    # the next snapshot came rollback_every_n_steps after the rollback, at a healthy step
    assert monitor.alerting.snapshot_step == 18


def test_without_alerts_rollback_leaves_training_bitwise_untouched(tmp_path):
    baseline = Recorder()
    trainer_for(tmp_path, [baseline], max_steps=12).fit(Regression())
    monitor = ScriptedMonitor(on_alert=ROLLBACK, rollback_every_n_steps=2)
    _, _, after = run(tmp_path, monitor, max_steps=12)
    assert monitor.alerting.snapshot is not None  # snapshots were taken (and changed nothing)
    assert_tensors_equal(after.states[12]["model"], baseline.states[12]["model"])
    assert_tensors_equal(after.states[12]["optimizer"], baseline.states[12]["optimizer"])


def test_rollbacks_to_the_same_snapshot_compound_the_cut_and_max_rollbacks_stops(tmp_path):
    monitor = ScriptedMonitor(alert_steps={12, 14, 16}, on_alert=ROLLBACK, rollback_every_n_steps=50, max_rollbacks=2)
    with pytest.warns(LandscapeWarning) as record:
        trainer, before, after = run(tmp_path, monitor, max_steps=30)
    messages = [str(w.message) for w in record if "[rollback]" in str(w.message)]
    assert "rolled back to step 1, lr x0.5 (rollback 1 of 2)" in messages[0]
    assert "rolled back to step 1, lr x0.25 (rollback 2 of 2)" in messages[1]
    assert "max_rollbacks=2 reached" in messages[2] and "stopping the run" in messages[2]
    assert trainer.global_step == 17  # stopped at the decision after the third alert
    assert_tensors_equal(after.states[15]["model"], before.states[1]["model"])
    # the second restore is still bitwise the snapshot: training after the first never wrote into it
    assert_tensors_equal(after.states[15]["optimizer"]["state"], before.states[1]["optimizer"]["state"])
    assert after.states[15]["lr"] == pytest.approx(before.states[1]["lr"] * 0.25, rel=1e-15)
    assert monitor.alerting.rollbacks == 2


def test_alert_before_any_snapshot_only_cuts_the_learning_rate(tmp_path):
    # the alert of step 0 is decided at the first safe point, before any healthy state was kept
    monitor = ScriptedMonitor(alert_steps={0}, on_alert=ROLLBACK, rollback_lr_factor=0.25)
    with pytest.warns(LandscapeWarning, match="no healthy state kept yet, nothing restored, lr x0.25"):
        _, before, after = run(tmp_path, monitor, max_steps=3)
    assert after.states[1]["lr"] == pytest.approx(before.states[1]["lr"] * 0.25, rel=1e-15)
    assert_tensors_equal(after.states[1]["model"], before.states[1]["model"])


def test_a_resumed_run_rolls_back_exactly_like_the_uninterrupted_one(tmp_path):
    # alerts at 12 and 17; snapshots at 1, 6, 11; rollback at 13 (to 11); the checkpoint at 16 holds the snapshot of
    # step 11 and its first restore, so the second rollback (at 18, to 11 again, lr x0.25) must happen after resuming
    def monitor():
        return ScriptedMonitor(alert_steps={12, 17}, on_alert=ROLLBACK, rollback_every_n_steps=5)

    # (every batch the same: Lightning resumes a checkpoint taken at an epoch's end by reading one extra batch)
    whole = monitor()
    trainer, _, _ = run(tmp_path / "whole", whole, max_steps=30, module=Regression(same_batches=True))
    expected = copy.deepcopy(trainer.lightning_module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict())

    first = monitor()
    trainer, _, _ = run(tmp_path / "first", first, max_steps=16, module=Regression(same_batches=True))
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    second = monitor()
    trainer, _, _ = run(tmp_path / "second", second, max_steps=30, module=Regression(same_batches=True), ckpt_path=path)
    assert second.alerting.rollbacks == whole.alerting.rollbacks == 2
    last = jsonl(tmp_path / "second")[-1]
    assert (last["step"], last["restored_step"], last["lr_factor"]) == (18, 11, 0.25)
    assert_tensors_equal(trainer.lightning_module.state_dict(), expected[0])
    assert_tensors_equal(trainer.optimizers[0].state_dict(), expected[1])


def test_a_rollback_agreed_in_the_optimizer_closure_waits_for_a_safe_point(tmp_path):
    # a monitor deciding inside on_before_optimizer_step: the rollback is carried out at the next safe point (here
    # the base class's on_train_batch_start), never inside Lightning's optimizer closure
    class DecidesEarly(ScriptedMonitor):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            fired, self._fired = self._fired, False
            self.decide_stop(trainer, fired)
            due.append((trainer.global_step, self.alerting._due is not None))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            LandscapeCallback.on_train_batch_start(self, trainer, pl_module, batch, batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pass

        def measure(self, trainer, pl_module, batches, step):
            return {}

    due = []
    monitor = DecidesEarly(alert_steps={12}, on_alert=ROLLBACK, rollback_every_n_steps=5)
    monitor.every_n_steps = 1000  # one measurement, then none
    # the probe set is complete at step 3: that measurement's decision keeps the only snapshot
    with pytest.warns(LandscapeWarning, match="step 13: rolled back to step 3, lr x0.5"):
        _, before, _ = run(tmp_path, monitor, max_steps=15)
    assert (12, True) in due and (11, False) in due  # agreed in the closure, not carried out there
    assert_tensors_equal(monitor.alerting.snapshot["model"], before.states[3]["model"])
    assert monitor.alerting.rollbacks == 1


def test_scaled_one_cycle_follows_the_schedule_of_a_lower_max_lr():
    def one_cycle(max_lr):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=40)

    optimizer, scheduler = one_cycle(0.1)
    reference_optimizer, reference = one_cycle(0.05)
    for _ in range(7):
        optimizer.step(), scheduler.step(), reference_optimizer.step(), reference.step()
    scale_learning_rates([optimizer], [scheduler], 0.5)
    for _ in range(30):  # through the peak and into the decay: OneCycleLR recomputes lr from the group's rates
        optimizer.step(), scheduler.step(), reference_optimizer.step(), reference.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)


def test_sequential_lr_children_are_scaled():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    second = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, second], milestones=[3])
    scale_learning_rates([optimizer], [scheduler], 0.5)
    for _ in range(5):
        optimizer.step(), scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.25  # the second child's 0.5 times the cut


def test_skip_drops_the_current_update_and_nothing_else(tmp_path):
    baseline = Recorder()
    trainer_for(tmp_path, [baseline], max_steps=8).fit(Regression(scheduler=None))
    monitor = ScriptedMonitor(alert_steps={5}, on_alert=["skip", "ignore"])
    _, before, _ = run(tmp_path, monitor, max_steps=8, module=Regression(scheduler=None))
    for step in range(1, 6):  # bitwise the run without the monitor until the skipped step
        assert_tensors_equal(before.states[step]["model"], baseline.states[step]["model"], f"step {step}")
    # step 5's update was not applied: parameters, Adam moments and step counts are step 5's start (BatchNorm's
    # running statistics did see the step's forward pass)
    parameters = [name for name, _ in Regression().named_parameters()]
    for name in parameters:
        assert torch.equal(before.states[6]["model"][name], before.states[5]["model"][name]), name
    assert_tensors_equal(before.states[6]["optimizer"], before.states[5]["optimizer"])
    assert not torch.equal(before.states[7]["model"]["net.0.weight"], before.states[6]["model"]["net.0.weight"])


def test_skip_without_alerts_is_bitwise_invisible(tmp_path):
    baseline = Recorder()
    trainer_for(tmp_path, [baseline], max_steps=8).fit(Regression())
    _, before, _ = run(tmp_path, ScriptedMonitor(on_alert=["skip", "ignore"]), max_steps=8)
    assert_tensors_equal(before.states[8], baseline.states[8])


def test_skip_after_the_optimizer_step_says_it_did_not_skip(tmp_path):
    monitor = ScriptedMonitor(alert_steps={5}, hook="on_train_batch_end", on_alert=["skip", "warn"])
    with pytest.warns(LandscapeWarning, match=r"\[update not skipped: the alert came after the optimizer step\]"):
        _, before, _ = run(tmp_path, monitor, max_steps=8)
    assert not torch.equal(before.states[6]["model"]["net.0.weight"], before.states[5]["model"]["net.0.weight"])


def test_skip_text_names_the_skipped_step(tmp_path):
    monitor = ScriptedMonitor(alert_steps={3}, on_alert=["skip", "warn"])
    with pytest.warns(LandscapeWarning, match=r"step 3: scripted \[update of step 3 skipped\]"):
        run(tmp_path, monitor, max_steps=5)


class Corrupted(Regression):
    """The loss of step 30 is 1000x: a gradient and loss spike for GradientSpikeMonitor."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000 if self.global_step == 30 else loss


def test_landscape_monitor_parts_share_one_keeper(tmp_path):
    monitor = LandscapeMonitor(
        hessian={"every_n_steps": 10, "on_alert": "ignore"},
        rank=False,
        connectivity=False,
        logits=False,
        grad_spikes={"warmup_steps": 10},
        on_alert=ROLLBACK,
        num_probe_batches=1,
        max_overhead=None,
        dashboard=False,
        rollback_every_n_steps=4,
    )
    assert all(part.alerting is monitor.alerting for part in monitor.parts.values())
    # snapshots after all parts ran at steps 0, 4, ..., 28; the spike of step 30 is decided at its end (step 31)
    with pytest.warns(LandscapeWarning, match=r"step 31: rolled back to step 28, lr x0\.5 \(rollback 1 of 3\)"):
        _, before, after = run(tmp_path, monitor, max_steps=40, module=Corrupted(scheduler=None, dtype=torch.float32))
    assert monitor.alerting.rollbacks == 1
    assert set(monitor.alerting.snapshot["monitors"]) == {"grad_spikes", "hessian"}  # every part's state
    assert_tensors_equal(after.states[31]["model"], before.states[28]["model"])
    assert "_alerting" in monitor.state_dict()  # the one keeper goes into the checkpoint once


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rollback_every_n_steps": 0}, ValueError, r"`rollback_every_n_steps` must be an int >= 1, got 0"),
        ({"rollback_every_n_steps": 2.0}, TypeError, r"`rollback_every_n_steps` must be an int, got 2.0"),
        ({"max_rollbacks": 0}, ValueError, r"`max_rollbacks` must be an int >= 1, got 0"),
        ({"rollback_lr_factor": 0.0}, ValueError, r"`rollback_lr_factor` must be > 0.0, got 0.0"),
        ({"rollback_lr_factor": 1.5}, ValueError, r"`rollback_lr_factor` must be <= 1.0, got 1.5"),
        ({"rollback_lr_factor": math.nan}, ValueError, r"`rollback_lr_factor` must be finite"),
        ({"on_alert": ["rollback", "stop"]}, ValueError, r"`on_alert` cannot combine 'rollback' and 'stop'"),
        ({"on_alert": "undo"}, ValueError, r"`on_alert` must be one of .*'skip', 'rollback'"),
    ],
)
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScriptedMonitor(**kwargs)
    with pytest.raises(error, match=match):
        LandscapeMonitor(**kwargs)


def test_a_part_cannot_set_the_shared_keepers_arguments():
    with pytest.raises(
        ValueError, match=r"`grad_spikes` sets `max_rollbacks`, but the parts share one rollback keeper"
    ):
        LandscapeMonitor(grad_spikes={"max_rollbacks": 5})


def test_rollbacks_and_their_text_reach_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = ScriptedMonitor(alert_steps={12}, on_alert=ROLLBACK, rollback_every_n_steps=5)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer_for(tmp_path, [monitor], max_steps=16, logger=logger).fit(Regression())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("landscape/rollbacks")] == [(13, 1.0)]
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("landscape/alerts/text_summary")]
    assert any("grad_spike · scripted [rollback requested]" in t for t in texts)
    assert any("step 13 · rollback · rolled back to step 11, lr x0.5 (rollback 1 of 3)" in t for t in texts)


def test_landscape_monitor_checkpoints_its_one_keeper(tmp_path):
    def bundle():
        return LandscapeMonitor(
            hessian=False, rank=False, connectivity=False, logits=False, on_alert=ROLLBACK, max_overhead=None,
            dashboard=False, rollback_every_n_steps=3,
        )  # fmt: skip

    monitor = bundle()
    trainer = trainer_for(tmp_path, [monitor], max_steps=8)
    trainer.fit(Regression(dtype=torch.float32))
    path = tmp_path / "bundle.ckpt"
    trainer.save_checkpoint(path)
    resumed = bundle()
    resumed.load_state_dict(torch.load(path, weights_only=False)["callbacks"][monitor.state_key])
    assert resumed.alerting.snapshot_step == monitor.alerting.snapshot_step == 6
    assert_tensors_equal(resumed.alerting.snapshot, monitor.alerting.snapshot)
