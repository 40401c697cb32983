"""LandscapeCallback: what every monitor shares (cadence, probe set, loss, model-state guard, logging, alerts)."""

from __future__ import annotations

import contextlib
import math
import random
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._alerting import (
    ALERT_ACTIONS,
    AlertAction,
    AlertDispatcher,
    LandscapeAlertError,
    OnAlert,
    validate_on_alert,
)
from lightning_landscape.core import distributed
from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core._validation import (
    LandscapeWarning,
    check_bool,
    check_callable,
    check_choice,
    check_int,
)
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.budget import MIN_TIMED_STEPS, MeasurementTimer, OverheadBudget
from lightning_landscape.core.hvp import MODES, check_loss

LossFn = Callable[[pl.LightningModule, Any], Tensor]
# the alert path lives in _alerting.py (re-exported here: these names were importable from this module)
_validate_on_alert = validate_on_alert
#: The annotation of ``loss_fn`` arguments: any return annotation (jsonargparse rejects a function given by import
#: path whose return annotation is not the declared one, and most loss functions have none).
UserLossFn = typing.Callable[[pl.LightningModule, Any], Any]
#: Largest accepted ``seed``: 2**32 - 1, so ``seed + index`` and the derived sketch seeds stay valid generator seeds.
MAX_SEED = 2**32 - 1


def is_sharded(strategy: Any) -> bool:
    """True for strategies that shard parameters or gradients across ranks (FSDP, DeepSpeed, model parallel)."""
    names = [cls.__name__ for cls in type(strategy).__mro__]
    return any(key in name for name in names for key in ("FSDP", "DeepSpeed", "ModelParallel"))


def _copy_batch(batch: Any) -> Any:
    # A real copy: the dataloader may reuse its buffers, and the probe set must never change.
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _to_device(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))


# The bookkeeping attributes a torchmetrics ``Metric`` changes in ``update``/``forward``/``compute`` besides its
# registered states (``_defaults``): torchmetrics 1.x, metric.py.
_METRIC_ATTRIBUTES = (
    "_update_count",
    "_computed",
    "_forward_cache",
    "_is_synced",
    "_cache",
    "_should_unsync",
    "_to_sync",
    "_enable_grad",
    "compute_on_cpu",
)


def _is_metric(module: nn.Module) -> bool:
    # duck-typed so torchmetrics stays optional: a Metric registers its states in `_defaults` and counts updates
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _clone_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)  # list states grow by append; the tensors already in them are not written in place
    return value


class _MetricSnapshot:
    """The states of every torchmetrics ``Metric`` registered under a module, restored bitwise.

    ``training_step`` used as the loss (``loss_fn=None``) runs the user's metric updates at every probe batch (at
    every Hessian-vector product for some backends): without this, an ``Accuracy`` updated there counts the probe
    set many times per measurement. Tensor states are copied back into the same tensor objects (``copy_``), list
    states get their original elements back in the original list object.
    """

    def __init__(self, module: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict[str, tuple[Any, Any]], dict[str, Any]]] = []
        for m in module.modules():
            if not _is_metric(m):
                continue
            states = {name: (getattr(m, name), _clone_state(getattr(m, name))) for name in m._defaults}
            extra = {name: _clone_state(getattr(m, name)) for name in _METRIC_ATTRIBUTES if hasattr(m, name)}
            self.saved.append((m, states, extra))

    def restore(self) -> None:
        for m, states, extra in self.saved:
            for name, (original, copy) in states.items():
                if isinstance(original, Tensor) and original.shape == copy.shape:
                    with torch.no_grad():
                        original.copy_(copy)
                    restored: Any = original
                elif isinstance(original, list):
                    original[:] = copy
                    restored = original
                else:
                    restored = copy
                setattr(m, name, restored)
            for name, value in extra.items():
                setattr(m, name, value)


@contextlib.contextmanager
def model_state_guard(module: nn.Module) -> Iterator[None]:
    """Restore, bitwise, everything a measurement could touch: train/eval flags, ``.grad``, ``requires_grad``,
    buffers, the states of torchmetrics ``Metric`` modules registered under ``module``, and the torch (CPU and
    CUDA), Python and NumPy RNG states.

    Not restored: plain Python attributes and tensors that are neither parameters, buffers nor metric states, which
    a ``training_step`` used as the loss may change (an EMA teacher updated in place, a step counter). Pass
    ``loss_fn`` when ``training_step`` does such things.
    """
    flags = [(m, m.training) for m in module.modules()]
    metrics = _MetricSnapshot(module)
    params = list(module.parameters())
    grads = [p.grad for p in params]
    requires = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_rng = None
    with contextlib.suppress(ImportError):
        import numpy as np

        np_rng = np.random.get_state()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        metrics.restore()
        for p, g, r in zip(params, grads, requires, strict=True):
            p.grad = g
            p.requires_grad_(r)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            import numpy as np

            np.random.set_state(np_rng)


@contextlib.contextmanager
def _logging_suppressed(module: pl.LightningModule) -> Iterator[None]:
    """``training_step`` as a loss function must not log: shadow ``log``/``log_dict`` on the instance."""
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    saved = {name: module.__dict__.get(name) for name in had}
    module.__dict__["log"] = lambda *args, **kwargs: None
    module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                module.__dict__[name] = saved[name]
            else:
                del module.__dict__[name]


def _training_step_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    output = module.training_step(batch, 0)
    if isinstance(output, dict):
        if "loss" not in output:
            raise TypeError(
                "`loss_fn` is None, so `training_step` is used as the loss, but it returned a dict without a 'loss' "
                f"key (keys: {sorted(output)}); pass `loss_fn=lambda module, batch: ...`."
            )
        output = output["loss"]
    if not isinstance(output, Tensor):
        raise TypeError(
            "`loss_fn` is None, so `training_step` is used as the loss, but it returned "
            f"{type(output).__name__}; it must return a Tensor or a dict with 'loss', or pass `loss_fn`."
        )
    return _check_attached(check_loss(output), "`training_step` (used as the loss because `loss_fn` is None)")


def _check_attached(loss: Tensor, source: str) -> Tensor:
    # With gradients enabled a measurement differentiates the loss; a detached one (`.item()`, `.detach()`, a loss
    # built under `torch.no_grad()`) would fail deep inside autograd without naming what returned it.
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise TypeError(
            f"{source} must return a loss attached to the autograd graph of the model's parameters, got a tensor "
            "without grad_fn (was it detached, rebuilt from `.item()`, or computed under `torch.no_grad()`?)."
        )
    return loss


def _user_loss(loss_fn: LossFn) -> LossFn:
    def checked(module: pl.LightningModule, batch: Any) -> Tensor:
        return _check_attached(check_loss(loss_fn(module, batch), name="loss_fn"), "`loss_fn`")

    return checked


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _is_configuration_error(err: BaseException) -> bool:
    """An argument error of ours (a ``loss_fn`` returning the wrong type, a selector matching nothing): raised by
    lightning-landscape's own checks, whose messages start by naming the argument in backticks. Those would fail at
    every measurement, so they are raised whatever ``strict`` (errors of the user's code or of libraries are not)."""
    if not isinstance(err, TypeError | ValueError) or not str(err).startswith("`"):
        return False
    tb_ = err.__traceback__
    while tb_ is not None and tb_.tb_next is not None:
        tb_ = tb_.tb_next
    return tb_ is not None and str(Path(tb_.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


class _PeerMeasurementFailed(RuntimeError):
    """Raised inside a measurement under DDP when another rank's measurement failed.

    See :func:`_failure_aware_collectives`."""


_COLLECTIVES = ("all_reduce_sum", "all_reduce_mean", "all_reduce_max", "broadcast", "any_true", "all_gather_object")


def _status_all_reduce(failed: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _agree_failed(failed: bool, device: torch.device) -> bool:
    """Whether the measurement failed on any rank (one 1-element all-reduce, the same as a status check)."""
    if not distributed.is_distributed():
        return failed
    return _status_all_reduce(failed, device)


@contextlib.contextmanager
def _failure_aware_collectives(device: torch.device, enabled: bool) -> Iterator[None]:
    """Precede every collective of ``core.distributed`` made inside a measurement by a 1-element status all-reduce.

    A rank whose measurement raised leaves ``measure`` and calls :func:`_agree_failed` with "failed": that
    all-reduce has the shape of a status check, so it meets its peers wherever they are (at their next collective's
    check, or at their own agreement). A peer that sees the failure raises :class:`_PeerMeasurementFailed` and skips
    the payload and its own agreement: every rank takes part in exactly one status all-reduce that reports the
    failure, and nobody waits in a collective another rank will never reach. Cost: one extra 1-element all-reduce
    per collective of a measurement (one per Hessian-vector product). The monitors call the collectives through the
    ``distributed`` module attribute at call time, which is what makes the swap below reach them.
    """
    if not enabled or not distributed.is_distributed():
        yield
        return
    originals = {name: getattr(distributed, name) for name in _COLLECTIVES}

    def checked(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _status_all_reduce(False, device):
                raise _PeerMeasurementFailed("The measurement failed on another rank.")
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(distributed, name, checked(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(distributed, name, original)


class LandscapeCallback(Callback):
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
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.start_step = check_int("start_step", start_step, minimum=0)
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
        #: The time ledger of budget mode (``LandscapeMonitor`` gives its parts one shared ledger).
        self.budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        self._expected_cost: float | None = None  # seconds of the previous measurement
        self._next_allowed: int | None = None  # first step the budget allows, decided once per measurement cycle
        self._provisional = False  # _next_allowed is only the step at which to decide again
        # set False by a measurement that was cheaper than the next will be (a first snapshot): budget mode then
        # estimates the next one with `first_cost_steps` instead of trusting this cost
        self._cost_is_typical = True
        #: Fraction of the budget this monitor's own measurements may spend (set by ``LandscapeMonitor``).
        self.budget_share = 1.0

        # runtime state (all of it goes through state_dict)
        self._probe: list[Any] = []
        self._probe_by_rank: list[list[Any]] | None = None
        self._loaded_probe_by_rank: list[list[Any]] | None = None
        self._pending = False
        self._last_measured_step = -1
        #: First optimizer step at which ``on_train_batch_start`` has anything to do (probe complete, no measurement
        #: due or pending before it): per-step hooks return at once before it (``LandscapeMonitor`` skips the call).
        self.idle_until = 0
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

    # ------------------------------------------------------------------------------------------ identity/state
    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call (profiler action names), so it is computed once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_fields())
        return self._state_key

    def _state_key_fields(self) -> dict[str, Any]:
        """The arguments that tell two instances of this monitor apart in one checkpoint."""
        return {"prefix": self.prefix}

    def state_dict(self) -> dict[str, Any]:
        probe = self._probe_by_rank if self._probe_by_rank is not None else [self._probe]
        return {
            "probe_by_rank": [[_to_device(b, torch.device("cpu")) for b in rank_probe] for rank_probe in probe],
            "pending": self._pending,
            "last_measured_step": self._last_measured_step,
            "alerts": [a.to_dict() for a in self.alerts],
            "alert_counts": dict(self.alert_counts),
            "monitor": self._monitor_state_dict(),
            **({"alerting": self.alerting.state_dict()} if self._owns_rollback_keeper() else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The rank is not known here; the probe slice of this rank is picked on the first batch.
        self._loaded_probe_by_rank = state_dict.get("probe_by_rank")
        self._pending = bool(state_dict.get("pending", False))
        self.idle_until = 0
        self._last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.alerts = [Alert.from_dict(a) for a in state_dict.get("alerts", [])]
        self._last_stored_step = {a.kind: a.step for a in self.alerts}
        self.alert_counts = {str(k): int(v) for k, v in state_dict.get("alert_counts", {}).items()}
        self._load_monitor_state_dict(state_dict.get("monitor", {}))
        if "alerting" in state_dict and self.alerting.monitors.get("") is self:
            self.alerting.load_state_dict(state_dict["alerting"])

    def _owns_rollback_keeper(self) -> bool:
        # a standalone monitor checkpoints its keeper (only with "rollback": the snapshot doubles the checkpoint)
        return self.alerting.monitors.get("") is self and self.alerting.rollback_enabled

    def _rollback_state(self) -> dict[str, Any]:
        """This monitor's state for the rollback snapshot: ``state_dict`` without the probe set (fixed), the alert
        history (kept across a rollback) and the dispatcher (which holds the snapshot), copied to the host."""
        state = self.state_dict()
        for key in ("probe_by_rank", "alerts", "alert_counts", "alerting"):
            state.pop(key, None)
        return apply_to_collection(state, Tensor, lambda t: t.detach().to("cpu", copy=True))

    def _rollback_restore(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_rollback_state`: the alert history and the probe set stay as they are."""
        kept = (self.alerts, self.alert_counts, self._probe, self._probe_by_rank, self._loaded_probe_by_rank)
        self.load_state_dict(state)
        self.alerts, self.alert_counts, self._probe, self._probe_by_rank, self._loaded_probe_by_rank = kept

    def _monitor_state_dict(self) -> dict[str, Any]:
        """Subclass state (tensors and primitives only)."""
        return {}

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_monitor_state_dict`."""

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is not None:
            self.budget.restart()
            self.budget.plan(self._planned_end(trainer))
        self._next_allowed = None
        self._provisional = False
        self.idle_until = 0
        self._check_probe_fits_epoch(trainer)

    def _check_probe_fits_epoch(self, trainer: pl.Trainer) -> None:
        # The dataloader's length is known from here on (inf for iterable datasets without a length).
        if not self._uses_probe_set() or self._probe_by_rank is not None or self._loaded_probe_by_rank:
            return
        per_epoch = trainer.num_training_batches
        if isinstance(per_epoch, int | float) and math.isfinite(per_epoch) and self.num_probe_batches > per_epoch:
            self._warn_once(
                "probe-longer-than-epoch",
                f"{type(self).__name__}: `num_probe_batches`={self.num_probe_batches} is larger than an epoch "
                f"({int(per_epoch)} training batches): the probe set completes only in a later epoch, and no "
                "measurement runs before it does. Lower `num_probe_batches`.",
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._uses_probe_set() and self._probe_by_rank is None and self.num_measurements == 0:
            self._warn_once(
                "probe-never-complete",
                f"{type(self).__name__} never completed its probe set ({len(self._probe)} of `num_probe_batches`="
                f"{self.num_probe_batches} batches seen), so it measured nothing in this fit. Lower "
                "`num_probe_batches` or train longer.",
            )

    def _uses_probe_set(self) -> bool:
        # monitors without a `measure` (GradientSpikeMonitor reads the training step itself) keep no probe set
        return type(self).measure is not LandscapeCallback.measure

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
        if step < self.idle_until:
            return
        if self.budget is not None:
            self.budget.start(step)
        if self._loaded_probe_by_rank is not None:
            self._restore_loaded_probe(trainer)
        if self._probe_by_rank is None:
            self._capture(trainer, batch)
        if step == self._last_measured_step:
            return  # a later micro-batch of the same optimizer step (gradient accumulation)
        due = step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0
        if due or self._pending:
            if self._probe_by_rank is None or self._over_budget(trainer, step):
                self._pending = True
            else:
                self._pending = False
                self._last_measured_step = step
                self._run(trainer, pl_module, step)
        if self._probe_by_rank is not None:
            self.idle_until = self._next_active_step(step)

    def _next_active_step(self, step: int) -> int:
        """After ``step`` was handled: the next step at which something can happen (the next due step, or the date
        at which a postponed measurement runs or is decided again). Every rank computes the same from the same
        state, so the collective decisions of budget mode stay in lockstep under DDP."""
        if self._pending:
            # postponed by the budget: nothing happens before the date it gave (decided again, or run, there)
            return max(step + 1, self._next_allowed if self._next_allowed is not None else step + 1)
        if step < self.start_step:
            return self.start_step
        return self.start_step + ((step - self.start_step) // self.every_n_steps + 1) * self.every_n_steps

    def _over_budget(self, trainer: pl.Trainer, step: int) -> bool:
        """Budget mode: whether a due measurement must wait.

        Collective when it decides: on the first due step after a measurement, and again at a provisional date
        (every rank reaches those steps, since cadence and pending state are the same on all ranks). Rank 0's clock
        decides and its decision is broadcast, so all ranks measure at the same step.
        """
        if self.budget is None:
            return False
        if self._next_allowed is None or (self._provisional and step >= self._next_allowed):
            decision = self._budget_wait(step)
            if trainer.world_size > 1:
                decision = trainer.strategy.broadcast(decision, src=0)
            wait, self._provisional = int(decision[0]), bool(decision[1])
            self._next_allowed = step + wait
        return self._provisional or step < self._next_allowed

    @staticmethod
    def _planned_end(trainer: pl.Trainer) -> float | None:
        """Budget mode's plan: the optimizer step at which this fit ends (``max_steps`` or the end of ``max_epochs``,
        whichever comes first), ``None`` or ``inf`` when the Trainer does not know it."""
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # an unsized dataloader or a strategy that cannot tell: plan without an end
            return float(trainer.max_steps) if trainer.max_steps >= 0 else None

    def _budget_wait(self, step: int) -> tuple[int, bool]:
        """(steps to wait, provisional): provisional means "decide again at that step" instead of "measure then".

        Every wait is provisional: the ledger is shared, so by the date computed now other parts' measurements and
        the per-step work may have spent what this one was waiting for; it measures only when it fits at that
        moment. With ``budget_share`` below 1 (``LandscapeMonitor`` splits its budget evenly between its periodic
        parts) it also keeps its own spending within its share, so a cheap frequent part cannot starve a costly one.
        (Until ``MIN_TIMED_STEPS`` steps are timed there is no step time to convert a cost with.) A first
        measurement (or one after an untypical one, e.g. the barrier's snapshot) needs only the total to fit: with
        the ledger's advance (see :mod:`lightning_landscape.core.budget`) it runs as soon as its estimate fits.
        """
        expected, share = self._expected_cost, self.budget_share
        if expected is None:  # never measured: estimate the cost from the mean step time
            per_step = self.budget.seconds_per_step(step)
            if per_step is None:
                return MIN_TIMED_STEPS, True
            expected = self.first_cost_steps * per_step
            # a first point needs only the total to fit (the ledger's advance pays for it early, and it is kept
            # out of the share, which spaces the later ones against the training time)
            share = 1.0
        wait = self.budget.steps_to_wait(expected, step, owner=id(self), share=share)
        # decided again at least every `every_n_steps`: a date computed on a spent ledger (past the planned end,
        # say) must not outlive the parts' and the step time's changes
        wait = min(wait, self.every_n_steps) if wait > 0 else 0
        return wait, wait > 0

    # ----------------------------------------------------------------------------------------------- probe set
    def _restore_loaded_probe(self, trainer: pl.Trainer) -> None:
        loaded, self._loaded_probe_by_rank = self._loaded_probe_by_rank, None
        if not loaded:
            return
        if len(loaded) == trainer.world_size and all(len(p) == self.num_probe_batches for p in loaded):
            self._probe_by_rank = loaded
            self._probe = loaded[trainer.global_rank]
        else:
            if len(loaded) != trainer.world_size:
                cause = f"was captured with {len(loaded)} process(es) and the world size is now {trainer.world_size}"
            else:
                sizes = sorted({len(p) for p in loaded})
                cause = (
                    f"holds {'/'.join(map(str, sizes))} batch(es) per process and `num_probe_batches` is "
                    f"{self.num_probe_batches} (the checkpoint was saved before its probe set was complete, or "
                    "`num_probe_batches` changed)"
                )
            self._warn_once(
                "probe-resume",
                f"{type(self).__name__}: the checkpoint's probe set {cause}; capturing a new probe set, so values "
                "before and after the resume are not directly comparable.",
            )

    def _capture(self, trainer: pl.Trainer, batch: Any) -> None:
        if self._probe_by_rank is not None:
            return
        self._probe.append(_copy_batch(batch))
        if len(self._probe) == self.num_probe_batches:
            # Every rank completes its probe set on the same batch, so this collective is reached by all.
            # Each rank keeps every rank's slice so a checkpoint (written by rank 0) restores all of them.
            cpu_probe = [_to_device(b, torch.device("cpu")) for b in self._probe]
            self._probe_by_rank = distributed.all_gather_object(cpu_probe) if trainer.world_size > 1 else [cpu_probe]

    def probe_batches(self, pl_module: pl.LightningModule) -> list[Any]:
        """This rank's probe set on the module's device."""
        return [_to_device(b, pl_module.device) for b in self._probe]

    def resolve_loss_fn(self, pl_module: pl.LightningModule) -> LossFn:
        """The loss used for measurements (the user's ``loss_fn`` or ``training_step``)."""
        if self.loss_fn is not None:
            return _user_loss(self.loss_fn)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: `loss_fn` must be given when the LightningModule uses manual optimization "
                "(its training_step steps the optimizer and cannot serve as a loss function); pass "
                "`loss_fn=lambda module, batch: ...` (to LandscapeMonitor, or in this part's dict)."
            )
        return _training_step_loss

    # ------------------------------------------------------------------------------------------- measurement
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        timer = MeasurementTimer(pl_module.device) if self.budget is not None else None
        if timer is not None:
            timer.start()
        started = time.perf_counter()
        self.num_measurements += 1
        distributed_run = trainer.world_size > 1
        failure: BaseException | None = None
        metrics: dict[str, float] = {}
        with (
            model_state_guard(pl_module),
            _logging_suppressed(pl_module),
            torch.enable_grad(),
            differentiable_attention(),
        ):
            if distributed_run:
                # DDP broadcasts rank 0's buffers at the start of each forward, but between steps every rank
                # holds running statistics updated by its own batches. Measure every rank on rank 0's buffers
                # (what the next forward would use); the guard gives each rank its own back afterwards.
                for buffer in pl_module.buffers():
                    distributed.broadcast(buffer)
            try:
                with _failure_aware_collectives(pl_module.device, enabled=distributed_run):
                    batches = self.probe_batches(pl_module)
                    metrics = self.measure(trainer, pl_module, batches, step)
            except LandscapeAlertError:
                raise  # on_alert="raise" is the user's choice, not a failure (every rank raises it: reduced values)
            except Exception as err:  # user code, OOM, library errors; KeyboardInterrupt and SystemExit pass
                failure = err
        failed = failure is not None
        if distributed_run and not isinstance(failure, _PeerMeasurementFailed):
            # The ranks agree before any later collective: a rank that failed answers here the status check its
            # peers make before their next collective inside `measure` (or their own agreement), so nobody waits.
            failed = _agree_failed(failed, pl_module.device)
        if failed:
            self._report_failure(failure, step)
            metrics = {self.key("status"): 0.0}
        else:
            metrics[self.key("status")] = 1.0
        # budget mode on CUDA: the device span too (one synchronisation), so that the ledger is true on a GPU
        cost = timer.stop() if timer is not None else time.perf_counter() - started
        metrics[self.key("seconds")] = cost
        if self.budget is not None:
            # a first measurement (or the first after an untypical one) is paid by the ledger's advance, not the
            # share; the very first of a fit is cold (no warm start, fresh caches), so its cost does not estimate the
            # next one, which is a first again
            seen = id(self) in self.budget.first_cost_by_owner
            self.budget.charge(cost, owner=id(self), first=self._expected_cost is None)
            self._expected_cost = cost if self._cost_is_typical and seen else None
            self._cost_is_typical = True
            self._next_allowed = None
            overhead = self.budget.overhead()
            if math.isfinite(overhead):  # nan before any training time (the first measurement)
                metrics[f"{self.prefix}/budget/overhead"] = overhead
        self.last_metrics = metrics
        self.log_metrics(trainer, metrics, step)
        self._after_measurement(trainer)

    def _report_failure(self, failure: BaseException | None, step: int) -> None:
        """Warn once per kind of failure (naming the monitor, the step and the error), or raise with ``strict``."""
        name = type(self).__name__
        if failure is None or isinstance(failure, _PeerMeasurementFailed):
            if self.strict:
                raise RuntimeError(
                    f"{name} measurement at step {step} failed on another rank (strict=True); see that rank's error."
                ) from failure
            self._warn_once(
                "measurement-failed-peer",
                f"{name} measurement at step {step} failed on another rank; every rank skipped it. Training "
                f"continues; the status is logged as `{self.key('status')}` (1 ok, 0 failed).",
            )
            return
        if self.strict or _is_configuration_error(failure):
            raise failure
        if isinstance(failure, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give training back the memory the failed measurement held
        kind = f"measurement-failed-{type(failure).__name__}"
        if kind in self._warned:
            return
        self._warned.add(kind)
        # every rank's own failure is reported (not rank 0's only): under DDP it may be the only one that failed
        warnings.warn(
            f"{name} measurement at step {step} failed: {type(failure).__name__}: {failure} Training continues; "
            f"the status is logged as `{self.key('status')}` (1 ok, 0 failed), and this warning is not repeated for "
            f"this kind of error. Pass strict=True to raise instead.",
            LandscapeWarning,
            stacklevel=2,
        )

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


__all__ = ["ALERT_ACTIONS", "AlertAction", "LandscapeAlertError", "LandscapeCallback", "model_state_guard"]
