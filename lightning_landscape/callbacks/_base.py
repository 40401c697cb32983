"""LandscapeCallback: the glue every monitor shares. A monitor is its ``measure()``; the rest is composed from

- :mod:`._schedule` (:class:`Scheduler`): cadence, budget decisions and their DDP agreement;
- :mod:`._probes` (:class:`ProbeSet`): the probe set, shared by the parts of a ``LandscapeMonitor``;
- :mod:`._guard`: the model-state guard and the logging suppression around a measurement;
- :mod:`._loss`: the loss a measurement evaluates (``loss_fn`` or ``training_step``);
- :mod:`._failures`: the agreement of every rank on a failed measurement;
- :mod:`._alerting` (:class:`AlertDispatcher`): actions, cooldown, the alert file, checkpoints, rollback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._alerting import (
    ALERT_ACTIONS,
    AlertAction,
    AlertDispatcher,
    LandscapeAlertError,
    OnAlert,
    validate_on_alert,
)

# re-exported: importable from here before the split
from lightning_landscape.callbacks._failures import (  # noqa: F401
    _agree_failed,
    _failure_aware_collectives,
    _is_configuration_error,
    _PeerMeasurementFailed,
    _status_all_reduce,
)
from lightning_landscape.callbacks._guard import (  # noqa: F401
    _is_metric,
    _logging_suppressed,
    _MetricSnapshot,
    model_state_guard,
)
from lightning_landscape.callbacks._loss import (  # noqa: F401
    LossFn,
    UserLossFn,
    _check_attached,
    _training_step_loss,
    _user_loss,
    resolve_loss,
)
from lightning_landscape.callbacks._measure import report_monitor_failure, run_measurement
from lightning_landscape.callbacks._probes import ProbeSet, host_copy, to_device
from lightning_landscape.callbacks._schedule import Scheduler, planned_end
from lightning_landscape.callbacks._state import MonitorState
from lightning_landscape.core._validation import (
    LandscapeWarning,
    check_bool,
    check_callable,
    check_choice,
    check_int,
)
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.budget import OverheadBudget
from lightning_landscape.core.hvp import MODES

# the alert path lives in _alerting.py (re-exported here: these names were importable from this module)
_validate_on_alert = validate_on_alert
_copy_batch, _to_device = host_copy, to_device
#: Largest accepted ``seed``: 2**32 - 1, so ``seed + index`` and the derived sketch seeds stay valid generator seeds.
MAX_SEED = 2**32 - 1


def is_sharded(strategy: Any) -> bool:
    """True for strategies that shard parameters or gradients across ranks (FSDP, DeepSpeed, model parallel)."""
    names = [cls.__name__ for cls in type(strategy).__mro__]
    return any(key in name for name in names for key in ("FSDP", "DeepSpeed", "ModelParallel"))


def _delegate(component: str, name: str) -> property:
    """An attribute of the monitor kept by one of its components (read and written through)."""

    def get(self: Any) -> Any:
        return getattr(getattr(self, component), name)

    def set_(self: Any, value: Any) -> None:
        setattr(getattr(self, component), name, value)

    return property(get, set_, doc=f"``self.{component}.{name}``")


class LandscapeCallback(MonitorState, Callback):
    """Base of every monitor: adapts Lightning hooks to one ``measure`` call on a fixed probe set.

    A measurement is due at optimizer step ``s`` when ``s >= start_step`` and ``(s - start_step) % every_n_steps ==
    0``. It runs in ``on_train_batch_start`` (before that step's forward pass), so the value logged at step ``s``
    describes the weights after ``s`` optimizer steps. If the probe set is not complete yet (``num_probe_batches``
    batches seen), the due measurement runs as soon as it is, and is logged at that step.

    Args:
        every_n_steps: cadence in optimizer steps.
        start_step: first step at which a measurement is due.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``, the mean loss on one batch. ``None`` uses
            ``pl_module.training_step(batch, 0)`` with logging suppressed (a Tensor or a dict with ``"loss"``).
        num_probe_batches: size of the probe set: the first N training batches seen, copied once; every
            measurement uses the same probe set, so values are comparable over time.
        mode: ``"eval"`` (running BatchNorm statistics, no dropout) or ``"train"`` (batch statistics, BatchNorm
            buffers untouched, dropout masks fixed by ``seed``).
        on_alert: ``"warn"``, ``"stop"``, ``"raise"``, ``"checkpoint"``, ``"ignore"``, ``"skip"`` (do not apply
            the current step's update; for alerts raised before the optimizer step), ``"rollback"`` (restore the
            last healthy state, multiply the learning rate by ``rollback_lr_factor``, go on; see
            :mod:`lightning_landscape.callbacks._alerting`), a callable taking an :class:`Alert`, or a list of these.
        prefix: metric key prefix.
        strict: raise when a measurement fails instead of logging a status and warning once per kind of error
            (errors that name one of your arguments, such as a ``loss_fn`` returning a non-scalar, always raise).
        seed: seeds the start vectors and the dropout masks of ``mode="train"``.
        alert_cooldown_steps: a repeat of the same alert kind within this many steps is logged and counted but
            does not warn or write another checkpoint again (callables, ``"stop"`` and ``"raise"`` always act).
        max_overhead: budget mode. ``None`` (default): measure exactly every ``every_n_steps``. A fraction
            (``0.05`` = 5%): the monitor times its own work against training time and postpones a due measurement
            until it fits the budget (``every_n_steps`` stays the shortest spacing; the first one waits for an
            estimate of its cost, ``first_cost_steps`` times the mean step time, to fit). Logs
            ``{prefix}/budget/overhead``. See :mod:`lightning_landscape.core.budget`.
        rollback_every_n_steps: with ``"rollback"``: the healthy-state snapshot (host memory) is refreshed at most
            this often, at a check that found nothing, with no rollback pending.
        max_rollbacks: with ``"rollback"``: rollbacks allowed; the next alert asking for one stops the run.
        rollback_lr_factor: with ``"rollback"``: each rollback multiplies the learning rate by this, in ``(0, 1]``
            (schedulers' base rates too, so the cut survives them). Logs ``{prefix}/rollbacks``.

    Raises:
        TypeError / ValueError: an argument has the wrong type or value (the message names it).
    """

    #: Name of this monitor's group in metric keys (``{prefix}/{group}/...``), e.g. ``"hessian"``.
    group = "landscape"
    #: True for monitors that need every parameter whole on every rank (second-order products, weight
    #: interpolation); they refuse sharded strategies with a message instead of computing a wrong number.
    needs_full_parameters = False
    #: True for monitors whose measurements evaluate the loss (``loss_fn`` or ``training_step``): under manual
    #: optimization without ``loss_fn`` they refuse at ``setup``, before the first training step.
    needs_loss = True
    #: Budget mode's estimate of a first measurement's cost, in training steps (later ones use the measured cost).
    #: Rough by design: ``benchmarks/overhead.py`` measures each monitor's cost per step on the reference workloads.
    first_cost_steps = 50.0
    #: Whether the first measurement of a fit is cold (no warm start yet: the Hessian's Lanczos), so that its cost
    #: does not estimate the next one, which budget mode then also treats as a first. False for a measurement whose
    #: cost does not depend on an earlier one (the rank): its second point is paid from its share.
    first_is_cold = True

    def __init__(
        self,
        *,
        every_n_steps: int = 100,
        start_step: int = 0,
        loss_fn: UserLossFn | None = None,
        num_probe_batches: int = 4,
        mode: str = "eval",
        on_alert: OnAlert = "warn",
        prefix: str = "landscape",
        strict: bool = False,
        seed: int = 0,
        alert_cooldown_steps: int = 100,
        max_overhead: float | None = None,
        rollback_every_n_steps: int = 50,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
    ) -> None:
        super().__init__()
        every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        start_step = check_int("start_step", start_step, minimum=0)
        if loss_fn is not None:
            check_callable("loss_fn", loss_fn, 2, "(pl_module, batch) -> Tensor", optional=True)
        self.loss_fn = loss_fn
        self.num_probe_batches = check_int("num_probe_batches", num_probe_batches, minimum=1)
        self.mode = check_choice("mode", mode, MODES)
        self.on_alert = _validate_on_alert(on_alert)
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"`prefix` must be a non-empty string without a trailing '/', got {prefix!r}.")
        self.prefix = prefix
        self.strict = check_bool("strict", strict)
        # seeds reach torch.Generator.manual_seed and NumPy-style 32-bit seeding after small offsets
        self.seed = check_int("seed", seed, minimum=0, maximum=MAX_SEED)
        self.alert_cooldown_steps = check_int("alert_cooldown_steps", alert_cooldown_steps, minimum=0)
        #: Actions, cooldown, alert file and the rollback keeper (``LandscapeMonitor`` gives its parts one).
        self.alerting = AlertDispatcher(rollback_every_n_steps, max_rollbacks, rollback_lr_factor, prefix=prefix)
        self.alerting.register("", self)
        self.max_overhead = max_overhead
        #: Cadence and budget decisions (the time ledger of budget mode: ``LandscapeMonitor`` shares one).
        self.schedule = Scheduler(
            self, every_n_steps, start_step, OverheadBudget(max_overhead) if max_overhead is not None else None
        )
        #: The probe set this monitor reads its first ``num_probe_batches`` batches from (its own, or the one its
        #: ``LandscapeMonitor`` shares: see :meth:`attach`).
        self.probes = ProbeSet(self.num_probe_batches)
        self._owns_probes = True

        # runtime state (all of it goes through state_dict)
        self.alerts: list[Alert] = []
        self.alert_counts: dict[str, int] = {}
        self.last_metrics: dict[str, float] = {}
        self._warned: set[str] = set()
        self._shared_warned: set[str] | None = None
        self._last_fired_step = -1  # step of the latest alert, stored or not (decides "stop")
        self._last_stored_step: dict[str, int] = {}  # per kind: the last alert kept in `.alerts` (AlertDispatcher)
        self._log_root = Path(".")
        self._state_key: str | None = None
        self._definition_logged = False
        #: Measurements run by this process since construction (budget mode decides how many fit).
        self.num_measurements = 0

    # The schedule's state, under the names the monitors (and their tests) have always used.
    every_n_steps = _delegate("schedule", "every_n_steps")
    start_step = _delegate("schedule", "start_step")
    #: The time ledger of budget mode (``None``: exact cadence).
    budget = _delegate("schedule", "budget")
    #: Fraction of the budget this monitor's own measurements may spend (set by ``LandscapeMonitor``).
    budget_share = _delegate("schedule", "share")
    #: First optimizer step at which ``on_train_batch_start`` has anything to do.
    idle_until = _delegate("schedule", "idle_until")
    _pending = _delegate("schedule", "pending")
    _last_measured_step = _delegate("schedule", "last_measured_step")
    _next_allowed = _delegate("schedule", "next_allowed")
    _provisional = _delegate("schedule", "provisional")
    _expected_cost = _delegate("schedule", "expected_cost")
    _cost_is_typical = _delegate("schedule", "cost_is_typical")
    _loaded_probe_by_rank = _delegate("probes", "loaded")
    _probe_by_rank = _delegate("probes", "by_rank")

    @property
    def _probe(self) -> list[Any]:
        """This rank's probe batches (host memory), the first ``num_probe_batches`` of the probe set."""
        return self.probes.batches if self._owns_probes else self.probes.first(self.num_probe_batches)

    @_probe.setter
    def _probe(self, batches: list[Any]) -> None:
        self.probes.batches = batches

    @classmethod
    def takes_probe_set(cls) -> bool:
        """Whether this monitor measures on a probe set (it implements :meth:`measure`); monitors without one
        (GradientSpikeMonitor reads the training step itself) keep no probe set."""
        return cls.measure is not LandscapeCallback.measure

    def _uses_probe_set(self) -> bool:
        return self.takes_probe_set()

    def needs_hook(self, hook: str) -> bool:
        """Whether this monitor, as configured, has work in the Lightning hook ``hook`` it overrides (default:
        every one). ``LandscapeMonitor`` does not forward the others: per-step hooks run thousands of times, and on
        a millisecond step each call that does nothing is a measurable part of the ledger."""
        return True

    #: Budget mode: an early-warning part (LogitMonitor), whose share is never shrunk by per-step work beyond its
    #: reserve (:meth:`~lightning_landscape.core.budget.OverheadBudget.shared_rate`): what that work overspends comes
    #: out of the curvature parts, whose points can wait, not out of the reads that warn before a run diverges.
    budget_protected = False

    @property
    def strides_rather_than_postpones(self) -> bool:
        """Budget mode: True for a monitor without periodic measurements (it reads every step, every few steps
        where the budget cannot afford that) rather than one that postpones a due measurement. ``LandscapeMonitor``
        gives it a fixed share of the budget instead of a weight among the periodic parts."""
        return not self.takes_probe_set()

    def attach(
        self,
        *,
        alerting: AlertDispatcher | None = None,
        warned: set[str] | None = None,
        probes: ProbeSet | None = None,
        budget: OverheadBudget | None = None,
        budget_share: float | None = None,
        first_cost_steps: float | None = None,
    ) -> None:
        """Join a composition (``LandscapeMonitor``): share its alert dispatcher (register the monitor there too),
        the set of warnings said once, its probe set (this monitor then reads its first ``num_probe_batches``
        batches and no longer captures nor checkpoints one), its time ledger, and set its budget share and first
        cost estimate. Arguments left ``None`` are left as they are."""
        if alerting is not None:
            self.alerting = alerting
        if warned is not None:
            self._shared_warned = warned
        if probes is not None:
            if probes.size < self.num_probe_batches:
                raise ValueError(
                    f"`probes` holds {probes.size} batch(es), fewer than this monitor's `num_probe_batches`="
                    f"{self.num_probe_batches}."
                )
            self.probes, self._owns_probes = probes, False
        if budget is not None:
            self.schedule.budget = budget
        if budget_share is not None:
            self.schedule.share = float(budget_share)
        if first_cost_steps is not None:
            self.first_cost_steps = float(first_cost_steps)

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.restart(trainer)
        self._check_probe_fits_epoch(trainer)

    def _check_probe_fits_epoch(self, trainer: pl.Trainer) -> None:
        # The dataloader's length is known from here on (inf for iterable datasets without a length).
        if not self._uses_probe_set() or self.probes.complete or self.probes.loaded:
            return
        per_epoch = trainer.num_training_batches
        if isinstance(per_epoch, int | float) and per_epoch < float("inf") and self.num_probe_batches > per_epoch:
            self._warn_once(
                "probe-longer-than-epoch",
                f"{type(self).__name__}: `num_probe_batches`={self.num_probe_batches} is larger than an epoch "
                f"({int(per_epoch)} training batches): the probe set completes only in a later epoch, and no "
                "measurement runs before it does. Lower `num_probe_batches`.",
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._uses_probe_set() and not self._probe_ready() and self.num_measurements == 0:
            self._warn_once(
                "probe-never-complete",
                f"{type(self).__name__} never completed its probe set ({len(self._probe)} of `num_probe_batches`="
                f"{self.num_probe_batches} batches seen), so it measured nothing in this fit. Lower "
                "`num_probe_batches` or train longer.",
            )

    def resolve_selectors(self, pl_module: pl.LightningModule) -> None:
        """Resolve this monitor's module/parameter selectors against the model, raising at ``setup`` (not at the
        first measurement, which budget mode may never reach) with an error naming the argument. Base: nothing."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.needs_full_parameters and is_sharded(trainer.strategy):
            raise ValueError(
                f"{type(self).__name__} needs every parameter whole on every rank, but strategy "
                f"{type(trainer.strategy).__name__} shards them. Use strategy='ddp' for runs you monitor with it, or "
                "keep only first-order monitors (GradientSpikeMonitor works under sharding)."
            )
        # `trainer.log_dir` is a collective under DDP (rank 0 broadcasts it): resolve it here, where every rank
        # runs, never from a rank-0-only branch.
        self._log_root = Path(trainer.log_dir or trainer.default_root_dir)
        self.alerting.log_root = self._log_root
        self.alerting.refresh()
        self.resolve_selectors(pl_module)
        if self.needs_loss and stage == "fit":
            self.resolve_loss_fn(pl_module)  # manual optimization without `loss_fn`: the error comes now

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.alerting._due is not None:  # a rollback agreed inside the optimizer closure: carried out here
            self.alerting.safe_point(trainer, snapshot=False)
        if self.schedule.is_idle(step):
            return
        if self.budget is not None:
            self.budget.start(step)
        if self._owns_probes:
            self.capture_probe(trainer, batch)
        ready = self._probe_ready()
        if self.schedule.should_measure(trainer, step, ready):
            self._run(trainer, pl_module, step)
        if ready:
            self.schedule.settle(step)

    # ----------------------------------------------------------------------------------------------- probe set
    def capture_probe(self, trainer: pl.Trainer, batch: Any) -> None:
        """Offer ``batch`` to the probe set (a checkpoint's set is applied first, at the first batch)."""
        if self.probes.loaded is not None:
            self._restore_loaded_probe(trainer)
        self.probes.capture(trainer.world_size, batch)

    def _restore_loaded_probe(self, trainer: pl.Trainer) -> None:
        self.probes.restore_loaded(trainer.world_size, trainer.global_rank, type(self).__name__, self._warn_once)

    def _probe_ready(self) -> bool:
        return self.probes.has(self.num_probe_batches)

    def probe_batches(self, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's probe set on the module's device (a copy there only for the measurement that asks)."""
        return self.probes.on_device(self.num_probe_batches, pl_module.device)

    def resolve_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        """The loss used for measurements (the user's ``loss_fn`` or ``training_step``)."""
        return resolve_loss(self.loss_fn, pl_module, type(self).__name__)

    # ------------------------------------------------------------------------------------------- measurement
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """One measurement (see :func:`~lightning_landscape.callbacks._measure.run_measurement`)."""
        run_measurement(self, trainer, pl_module, step)

    def _report_failure(self, failure: BaseException | None, step: int) -> None:
        report_monitor_failure(self, failure, step)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        """Compute this monitor's metrics on the probe set. Runs inside the model-state guard; may call
        :meth:`emit_alert`. Returns ``{full_key: value}``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- logging
    def key(self, name: str) -> str:
        """Full metric key ``{prefix}/{group}/{name}``."""
        return f"{self.prefix}/{self.group}/{name}"

    def log_metrics(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Send scalars to every attached logger (loggers write on rank 0 only)."""
        if not trainer.loggers:
            self._warn_once(
                "no-logger",
                "lightning-landscape: the Trainer has no logger, so no metric is written (measurements and alerts go "
                "on; values stay in `.last_metrics`). Pass `logger=TensorBoardLogger('runs')` to the Trainer.",
                shared=True,
            )
            return
        for logger in trainer.loggers:
            if not tb.log_scalars(trainer, logger, metrics, step):
                logger.log_metrics(dict(metrics), step=step)

    def log_definition(self, trainer: pl.Trainer, text: str) -> None:
        """Log the operator definition once as TensorBoard text."""
        if self._definition_logged:
            return
        self._definition_logged = True
        tb.log_text(trainer, f"{self.prefix}/{self.group}/definition", text, trainer.global_step)

    def _warn_once(self, key: str, message: str, shared: bool = False) -> None:
        # `shared` warnings are said once per LandscapeMonitor, not once per part (the bundle shares the set)
        warned = self._shared_warned if shared and self._shared_warned is not None else self._warned
        if key in warned:
            return
        warned.add(key)
        rank_zero_warn(message, category=LandscapeWarning)

    # ------------------------------------------------------------------------------------------------ alerts
    def emit_alert(self, trainer: pl.Trainer, alert: Alert) -> None:
        """Record, log and act on an alert (every alert is logged, whatever the action).

        Logged as ``{prefix}/alerts/{kind}`` (count so far), as TensorBoard text under ``{prefix}/alerts`` (with
        what a rescue action did), and appended as one JSON line to ``landscape_alerts.jsonl`` in the log directory
        (TensorBoard samples long scalar series, so an isolated alert could otherwise vanish from the chart). The
        actions are carried out by :class:`~lightning_landscape.callbacks._alerting.AlertDispatcher`.
        """
        self.alerting.emit(self, trainer, alert)

    def decide_stop(self, trainer: pl.Trainer, fired: bool) -> None:
        """The decision point after a check: with ``"stop"``, stop every rank if any rank fired; with
        ``"rollback"``, agree on a requested rollback and carry it out. Collective: call it on every rank at the
        same point (decisions come from reduced values, so every rank reaches it)."""
        self.alerting.decide(self, trainer, fired)

    def _after_measurement(self, trainer: pl.Trainer) -> None:
        self.decide_stop(trainer, self._last_fired_step == self._last_measured_step)

    # budget mode's internals, under their former names (tests and benchmarks call them)
    _planned_end = staticmethod(planned_end)

    def _budget_wait(self, step: int) -> tuple[int, bool]:
        return self.schedule.budget_wait(step)


__all__ = ["ALERT_ACTIONS", "AlertAction", "LandscapeAlertError", "LandscapeCallback", "OnAlert", "model_state_guard"]
