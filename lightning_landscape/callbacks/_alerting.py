"""The alert dispatcher: what happens once a monitor raises an :class:`Alert` (actions, cooldown, the alert file,
checkpoints) and the rescue actions ``"skip"`` and ``"rollback"`` with their keeper of the last healthy state.

Every monitor delegates here (``LandscapeCallback.emit_alert`` / ``decide_stop``); a standalone monitor has its own
dispatcher, the parts of a ``LandscapeMonitor`` share one (one snapshot, one rollback counter).

Rollback, step by step:

* **Keep.** While the run is healthy the dispatcher keeps one snapshot in host memory: the module's ``state_dict``
  (parameters and buffers), every optimizer's and LR scheduler's ``state_dict``, the gradient scaler's, and every
  monitor's own state (detectors, rules; not its alert history or probe set). It is refreshed at a safe point (the
  end of a check in ``on_train_batch_start`` / ``on_train_batch_end``; in ``LandscapeMonitor`` after all parts ran)
  once ``rollback_every_n_steps`` steps passed since the previous one, and only when no rollback alert is pending.
  Cost: one copy of weights + optimizer state to host memory per refresh (memory: about that size, once).
* **Decide.** An alert whose monitor has ``"rollback"`` among its actions marks a request on its rank. At the next
  decision point (``decide_stop``, called by every rank at the same place) the request is agreed with
  ``trainer.strategy.reduce_boolean_decision`` (any rank), so every rank rolls back at the same step.
* **Restore.** At the decision point when it is a safe hook (``on_train_batch_start``/``on_train_batch_end``,
  outside Lightning's optimizer closure), else at the next safe point: the snapshot is copied back bitwise,
  gradients are dropped, and the learning rate is multiplied by ``rollback_lr_factor`` (compounded over
  consecutive rollbacks to the same snapshot): each param group's ``lr``, ``initial_lr``, ``max_lr``, ``min_lr``
  and each scheduler's ``base_lrs``, ``max_lrs`` and ``_last_lr`` (children of ``SequentialLR``/``ChainedScheduler``
  too), so LambdaLR/OneCycleLR/CyclicLR, which recompute ``lr`` from those every step, keep the cut. Training goes
  on with the next batches: the batches between the snapshot and the alert are skipped, not replayed.
  ``trainer.global_step`` is not rewound (``max_steps`` counts the steps spent); RNG states are not restored.
  A decision taken inside ``on_before_optimizer_step`` lets that step's update happen; it is undone by the restore.
* **Bound.** After ``max_rollbacks`` rollbacks the next one stops the run instead (``trainer.should_stop``) with a
  warning that says so. Logged: ``{prefix}/rollbacks`` (count so far), the TensorBoard text
  ``"step S · rollback · rolled back to step N, lr x0.5 (rollback 1 of 3) after grad_spike at step S"``, a warning,
  and a JSON line ``{"step", "action": "rollback", "restored_step", "lr_factor", "rollbacks", "alerts"}`` in
  ``landscape_alerts.jsonl``.
* **Resume.** The snapshot and the counter go into the checkpoint (the owning callback's state), so a resumed run
  rolls back exactly as the uninterrupted one would (the checkpoint holds weights and optimizer state twice).

``"skip"``: an alert about the current step raised in ``on_before_optimizer_step`` (GradientSpikeMonitor's)
drops every gradient of the module, so torch optimizers leave every parameter and its state (momentum, step count)
untouched: the step's update is not applied. Under a GradScaler the scale was already checked by ``unscale_``, so
``scaler.step`` calls ``optimizer.step()`` on no gradients and ``scaler.update()`` counts the step as usual.
An alert raised after the optimizer step cannot be skipped; its text says so. Under DDP the skip is decided on each
rank from the alert, which GradientSpikeMonitor computes from all-reduced gradients, so every rank skips together.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._probes import host_copy as _host_copy
from lightning_landscape.core._validation import LandscapeWarning, check_callable, check_float, check_int
from lightning_landscape.core.alerts import Alert

if TYPE_CHECKING:
    from lightning_landscape.callbacks._base import LandscapeCallback

AlertName = Literal["warn", "stop", "raise", "checkpoint", "ignore", "skip", "rollback"]
# typing.Callable/Sequence, not collections.abc's: jsonargparse 4.x silently drops a collections.abc.Callable member
# from a union, so a callable given in a config would not parse.
AlertAction = AlertName | typing.Callable[[Alert], None]
#: The annotation of every ``on_alert`` argument. jsonargparse (LightningCLI) tries a union's members in order and
#: cannot serialise a list whose item type mixes strings and callables ("Unable to serialize instance" in the saved
#: config.yaml), so the members it can write back come first: a name, a list of names, one callable (by import
#: path). Other sequences (callables, mixed lists) are accepted from Python.
OnAlert = AlertName | list[AlertName] | typing.Callable[[Alert], None] | typing.Sequence[AlertAction]
ALERT_ACTIONS = get_args(AlertName)
#: Alert JSONL files written by this process: resolved path -> id of the Trainer that started it (see _append_jsonl).
_JSONL_STARTED: dict[str, int] = {}
#: Hooks outside Lightning's optimizer closure, where weights and optimizer state may be replaced.
SAFE_HOOKS = ("on_train_batch_start", "on_train_batch_end")
#: Learning-rate entries scaled by a rollback (param groups; scheduler attributes).
LR_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
LR_SCHEDULER_ATTRIBUTES = ("base_lrs", "max_lrs", "_last_lr")


class LandscapeAlertError(RuntimeError):
    """Raised by ``on_alert="raise"``; carries the :class:`Alert` as ``.alert``."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


def validate_on_alert(on_alert: Any) -> list[AlertAction]:
    """``on_alert`` as a list of actions; raises naming the argument."""
    actions = list(on_alert) if isinstance(on_alert, list | tuple) else [on_alert]
    if not actions:
        raise ValueError("`on_alert` must name at least one action, got an empty list.")
    for action in actions:
        if callable(action):
            check_callable("on_alert", action, 1, "taking an Alert")
            continue
        if not isinstance(action, str) or action not in ALERT_ACTIONS:
            raise ValueError(
                f"`on_alert` must be one of {ALERT_ACTIONS}, a callable taking an Alert, or a list of these, "
                f"got {action!r}."
            )
    if "rollback" in actions and "stop" in actions:
        raise ValueError(
            "`on_alert` cannot combine 'rollback' and 'stop' (rollback already stops the run after `max_rollbacks` "
            f"rollbacks), got {actions!r}."
        )
    return actions


def _clone(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.clone())


def _scale(value: Any, factor: float) -> Any:
    if isinstance(value, list | tuple):
        return type(value)(_scale(v, factor) for v in value)
    return value * factor if isinstance(value, int | float | Tensor) and not isinstance(value, bool) else value


def scale_learning_rates(optimizers: Sequence[Any], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply every learning-rate entry that optimizers and schedulers read (see :data:`LR_GROUP_KEYS`,
    :data:`LR_SCHEDULER_ATTRIBUTES`) by ``factor``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in LR_GROUP_KEYS:
                if key in group:
                    group[key] = _scale(group[key], factor)
    pending = list(schedulers)
    while pending:
        scheduler = pending.pop()
        pending.extend(getattr(scheduler, "_schedulers", []))  # SequentialLR / ChainedScheduler children
        for attribute in LR_SCHEDULER_ATTRIBUTES:
            if hasattr(scheduler, attribute):
                setattr(scheduler, attribute, _scale(getattr(scheduler, attribute), factor))


def _current_hook(trainer: pl.Trainer) -> str | None:
    # Lightning sets the hook's name on the module while it calls callback hooks
    module = getattr(trainer, "lightning_module", None)
    return getattr(module, "_current_fx_name", None)


class AlertDispatcher:
    """Owns what happens after an alert: the actions, their cooldown, the alert file, alert checkpoints, and the
    rescue actions (``"skip"``, ``"rollback"`` with its snapshot keeper). See the module docstring for rollback.

    Args:
        rollback_every_n_steps: the snapshot is refreshed at the first safe point at least this many optimizer
            steps after the previous one (or after the last rollback) with no rollback alert pending.
        max_rollbacks: rollbacks allowed in one run; the next alert that asks for one stops the run.
        rollback_lr_factor: each rollback multiplies the learning rate by this factor, in ``(0, 1]``.
        prefix: metric key prefix of ``{prefix}/rollbacks``.
    """

    def __init__(
        self,
        rollback_every_n_steps: int = 50,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        prefix: str = "landscape",
    ) -> None:
        self.rollback_every_n_steps = check_int("rollback_every_n_steps", rollback_every_n_steps, minimum=1)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, minimum=1)
        self.rollback_lr_factor = check_float(
            "rollback_lr_factor", rollback_lr_factor, minimum=0.0, maximum=1.0, strict_minimum=True
        )
        self.prefix = prefix
        #: The monitors that report here, by name (their state is part of the snapshot).
        self.monitors: dict[str, LandscapeCallback] = {}
        self.rollback_enabled = False
        #: False in LandscapeMonitor: snapshots are taken after all parts ran, not inside one part's check.
        self.snapshot_at_decisions = True
        self.log_root = Path(".")
        self._last_alert_step: dict[tuple[int, str], int] = {}
        # the keeper (all of it goes through state_dict)
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_step = -1
        self.rollbacks = 0
        self._restores_of_snapshot = 0  # rollbacks to the current snapshot (the lr cut compounds)
        self._next_snapshot_step = 0
        # a rollback alert seen on this rank, not yet agreed / agreed and waiting for a safe point
        self._requested: list[Alert] = []
        self._due: list[Alert] | None = None

    def register(self, name: str, monitor: LandscapeCallback) -> None:
        self.monitors[name] = monitor
        self.refresh()

    def refresh(self) -> None:
        """Read the monitors' ``on_alert`` again (at ``setup``): whether any asks for rollbacks. Cached, since the
        per-step safe points must cost next to nothing when none does."""
        self.rollback_enabled = any("rollback" in m.on_alert for m in self.monitors.values())

    # ------------------------------------------------------------------------------------------------ alerts
    def emit(self, monitor: LandscapeCallback, trainer: pl.Trainer, alert: Alert) -> None:
        """Record, log and act on an alert of ``monitor`` (every alert is logged, whatever the action)."""
        key = (id(monitor), alert.kind)
        previous = self._last_alert_step.get(key)
        repeat = previous is not None and alert.step - previous < monitor.alert_cooldown_steps
        self._last_alert_step[key] = alert.step
        monitor._last_fired_step = alert.step
        monitor.alert_counts[alert.kind] = monitor.alert_counts.get(alert.kind, 0) + 1
        count = float(monitor.alert_counts[alert.kind])
        monitor.log_metrics(trainer, {f"{monitor.prefix}/alerts/{alert.kind}": count}, alert.step)
        # Storage is bounded: an alert that continues an episode (the same kind fired at the previous step) goes
        # into `.alerts`, the checkpoint, the TensorBoard text and the JSONL only once per cooldown window (anchored
        # at the last one kept); the count above includes every one. A condition that fires every step (weights
        # gone NaN) otherwise stores an alert per step forever. Separate events (a gap of a step or more) are kept.
        stored = monitor._last_stored_step.get(alert.kind)
        # (a second alert of the kind at the same step, about another metric, is its own event)
        continues = previous is not None and alert.step - previous == 1
        keep = (
            not continues
            or stored is None
            or alert.step < stored
            or alert.step - stored >= max(monitor.alert_cooldown_steps, 1)
        )
        if keep:
            monitor._last_stored_step[alert.kind] = alert.step
            monitor.alerts.append(alert)
        notes = []
        if "skip" in monitor.on_alert:
            notes.append(self._skip(trainer, alert))
        if "rollback" in monitor.on_alert:
            self._requested.append(alert)
            notes.append("rollback requested")
        note = f" [{'; '.join(notes)}]" if notes else ""
        if keep:
            text = f"step {alert.step} · {alert.kind} · {alert.message}{note}"
            tb.log_text(trainer, f"{monitor.prefix}/alerts", text, alert.step)
            self._append_jsonl(trainer, alert.to_dict())
        for action in monitor.on_alert:
            if callable(action):
                action(alert)
            elif action == "warn" and not repeat:
                rank_zero_warn(f"[{alert.kind}] step {alert.step}: {alert.message}{note}", category=LandscapeWarning)
            elif action == "checkpoint" and not repeat:
                path = self.log_root / "landscape_alerts" / f"{alert.kind}-step={alert.step}.ckpt"
                trainer.save_checkpoint(str(path))
            elif action == "raise":
                raise LandscapeAlertError(alert)

    def _skip(self, trainer: pl.Trainer, alert: Alert) -> str:
        if _current_hook(trainer) != "on_before_optimizer_step" or alert.step != trainer.global_step:
            return "update not skipped: the alert came after the optimizer step"
        for parameter in trainer.lightning_module.parameters():
            parameter.grad = None  # torch optimizers skip parameters without a gradient (their state too)
        return f"update of step {alert.step} skipped"

    def _append_jsonl(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        # Only into a logger's directory: without a logger the log directory is the working directory, and a file
        # there would collect the alerts of every run started from it.
        if not trainer.is_global_zero or not trainer.loggers:
            return
        self.log_root.mkdir(parents=True, exist_ok=True)
        path = self.log_root / "landscape_alerts.jsonl"
        # A fit starts the file afresh (a log directory reused by a fixed logger version must not mix runs), unless
        # it resumes from a checkpoint; every monitor of this Trainer then appends to it.
        key = str(path.resolve())
        fresh = _JSONL_STARTED.get(key) != id(trainer) and trainer.ckpt_path is None
        _JSONL_STARTED[key] = id(trainer)
        with open(path, "w" if fresh else "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def decide(self, monitor: LandscapeCallback, trainer: pl.Trainer, fired: bool) -> None:
        """The decision point after a check: ``"stop"`` stops every rank if any fired; a rollback requested on any
        rank is agreed and carried out (at once in a safe hook). Collective: call it on every rank at the same
        point."""
        # stop every ddp process if any world process decides to stop
        if "stop" in monitor.on_alert and trainer.strategy.reduce_boolean_decision(fired, all=False):
            trainer.should_stop = True
        if not self.rollback_enabled:
            return
        if trainer.strategy.reduce_boolean_decision(bool(self._requested), all=False):
            self._due = (self._due or []) + self._requested
        self._requested = []
        self.safe_point(trainer, snapshot=self.snapshot_at_decisions)

    # ---------------------------------------------------------------------------------------------- rollback
    def safe_point(self, trainer: pl.Trainer, snapshot: bool = True) -> None:
        """Carry out an agreed rollback, or refresh the snapshot when due. Every rank must reach the same safe
        points (the decision points, ``LandscapeMonitor``'s hooks); nothing happens inside the optimizer closure."""
        if not self.rollback_enabled or _current_hook(trainer) not in SAFE_HOOKS:
            return
        if self._due is not None:
            self._rollback(trainer)
        elif snapshot and trainer.global_step >= self._next_snapshot_step:
            # local requests not yet agreed (an emitter that has not reached its decision point): agree now, so
            # every rank keeps the same snapshot (a collective only every `rollback_every_n_steps` steps)
            if trainer.strategy.reduce_boolean_decision(bool(self._requested), all=False):
                self._due, self._requested = self._requested, []
                self._rollback(trainer)
            else:
                self.take_snapshot(trainer)

    def take_snapshot(self, trainer: pl.Trainer) -> None:
        """Copy the current state to host memory (see the module docstring for what it holds)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.snapshot = {
            "model": _host_copy(trainer.lightning_module.state_dict()),
            "optimizers": [_host_copy(o.state_dict()) for o in trainer.optimizers],
            "schedulers": [_host_copy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
            "scaler": _host_copy(scaler.state_dict()) if scaler is not None else None,
            "monitors": {name: m._rollback_state() for name, m in self.monitors.items()},
        }
        self.snapshot_step = trainer.global_step
        self._restores_of_snapshot = 0
        self._next_snapshot_step = trainer.global_step + self.rollback_every_n_steps

    def _rollback(self, trainer: pl.Trainer) -> None:
        alerts, self._due = self._due or [], None
        step = trainer.global_step
        cause = ", ".join(f"{a.kind} at step {a.step}" for a in alerts)
        monitor = next(iter(self.monitors.values()))
        if self.rollbacks >= self.max_rollbacks:
            trainer.should_stop = True
            message = (
                f"max_rollbacks={self.max_rollbacks} reached: {cause} asked for another rollback at step {step}; "
                "stopping the run (raise `max_rollbacks` or lower the learning rate)."
            )
            tb.log_text(trainer, f"{self.prefix}/alerts", f"step {step} · rollback · {message}", step)
            self._append_jsonl(trainer, {"step": step, "action": "stop", "rollbacks": self.rollbacks, "alerts": cause})
            rank_zero_warn(f"[rollback] step {step}: {message}", category=LandscapeWarning)
            return
        self.rollbacks += 1
        self._restores_of_snapshot += 1
        if self.snapshot is not None:
            self._restore(trainer)
            factor = self.rollback_lr_factor**self._restores_of_snapshot
            what = f"rolled back to step {self.snapshot_step}"
        else:  # an alert before the first healthy point: nothing to restore, the learning rate is still cut
            factor = self.rollback_lr_factor
            what = "no healthy state kept yet, nothing restored"
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        scale_learning_rates(trainer.optimizers, schedulers, factor)
        for parameter in trainer.lightning_module.parameters():
            parameter.grad = None  # gradients of the rolled-back trajectory (or a partial accumulation)
        self._next_snapshot_step = step + self.rollback_every_n_steps
        message = f"{what}, lr x{factor:g} (rollback {self.rollbacks} of {self.max_rollbacks}) after {cause}"
        monitor.log_metrics(trainer, {f"{self.prefix}/rollbacks": float(self.rollbacks)}, step)
        tb.log_text(trainer, f"{self.prefix}/alerts", f"step {step} · rollback · {message}", step)
        self._append_jsonl(
            trainer,
            {
                "step": step,
                "action": "rollback",
                "restored_step": self.snapshot_step if self.snapshot is not None else None,
                "lr_factor": factor,
                "rollbacks": self.rollbacks,
                "alerts": cause,
            },
        )
        rank_zero_warn(f"[rollback] step {step}: {message}", category=LandscapeWarning)

    def _restore(self, trainer: pl.Trainer) -> None:
        snapshot = self.snapshot
        module = trainer.lightning_module
        # copies in place (same tensors, so the optimizers keep their references); clones, so that training never
        # writes into the snapshot (optimizers alias loaded CPU tensors)
        module.load_state_dict(_clone(snapshot["model"]))
        for optimizer, state in zip(trainer.optimizers, snapshot["optimizers"], strict=True):
            optimizer.load_state_dict(_clone(state))
        for config, state in zip(trainer.lr_scheduler_configs, snapshot["schedulers"], strict=True):
            config.scheduler.load_state_dict(_clone(state))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and snapshot["scaler"] is not None:
            scaler.load_state_dict(_clone(snapshot["scaler"]))
        for name, monitor in self.monitors.items():
            if name in snapshot["monitors"]:
                monitor._rollback_restore(_clone(snapshot["monitors"][name]))

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "snapshot_step": self.snapshot_step,
            "rollbacks": self.rollbacks,
            "restores_of_snapshot": self._restores_of_snapshot,
            "next_snapshot_step": self._next_snapshot_step,
            "requested": [a.to_dict() for a in self._requested],
            "due": None if self._due is None else [a.to_dict() for a in self._due],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = state.get("snapshot")
        self.snapshot_step = int(state.get("snapshot_step", -1))
        self.rollbacks = int(state.get("rollbacks", 0))
        self._restores_of_snapshot = int(state.get("restores_of_snapshot", 0))
        self._next_snapshot_step = int(state.get("next_snapshot_step", 0))
        self._requested = [Alert.from_dict(a) for a in state.get("requested", [])]
        due = state.get("due")
        self._due = None if due is None else [Alert.from_dict(a) for a in due]


__all__ = ["ALERT_ACTIONS", "AlertDispatcher", "LandscapeAlertError", "scale_learning_rates", "validate_on_alert"]
