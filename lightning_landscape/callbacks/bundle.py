"""LandscapeMonitor: every monitor behind one callback and one configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._alerting import AlertDispatcher
from lightning_landscape.callbacks._base import LandscapeCallback, OnAlert, UserLossFn
from lightning_landscape.callbacks._probes import ProbeSet, migrate_part_probes
from lightning_landscape.callbacks.connectivity import ModeConnectivityMonitor
from lightning_landscape.callbacks.grad_spikes import GradientSpikeMonitor
from lightning_landscape.callbacks.hessian import HessianMonitor
from lightning_landscape.callbacks.logits import LogitMonitor
from lightning_landscape.callbacks.rank import EffectiveRankMonitor
from lightning_landscape.core._validation import LandscapeWarning, check_float
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.budget import OverheadBudget

# Default cadence of each part, in optimizer steps (the gradient monitor runs every step).
DEFAULT_EVERY = {"hessian": 200, "rank": 200, "connectivity": 200, "logits": 10}
#: Probe batches of each part when ``num_probe_batches`` is not given: one for the Hessian and the barrier (a
#: Hessian-vector product or an interpolation point is a pass over the probe set, so one batch is 2-4x cheaper
#: on the CNN and the transformer, see benchmarks/RESULTS.md), four for the rank (a rank needs more samples than
#: features: 4 x 64 examples for a 256-wide layer), one for the logits (every few steps).
DEFAULT_PROBE_BATCHES = {"hessian": 1, "rank": 4, "connectivity": 1, "logits": 1}
#: Other arguments the bundle gives a part unless its dict sets them. The Hessian stops at a 1% eigenvalue bound
#: instead of 0.1% (measured, the values then differed from tol 1e-3 by at most 0.4%, mostly under 0.01%, in ~20%
#: fewer products), and sizes its operator to the budget (``probe_fraction="auto"``: half a batch where a whole one
#: does not fit 45% of its share of 500 steps, see callbacks/_hessian_probe.py): a warm measurement on a whole batch
#: at tol 1e-3 was 9-27 training steps on the transformers, more than the Hessian's share of a 500-step window at 5%
#: (~17 steps), and 3.5-11 on half a batch at tol 1e-2 (benchmarks/RESULTS.md, issue 16).
DEFAULT_ARGUMENTS: dict[str, dict[str, Any]] = {
    "hessian": {"probe_fraction": "auto", "tol": 1e-2},
    # the curve image is a 60-90 ms matplotlib figure: on millisecond models most of a barrier's cost (the scalars
    # carry the same numbers); connectivity={"curve_image": True} draws it
    "connectivity": {"curve_image": False},
}
#: Share of the bundle's budget the gradient monitor's every-step reads may take before it reads every few steps
#: (see GradientSpikeMonitor.stride), kept out of the periodic parts' shares (``OverheadBudget.reserved_per_step``).
GRAD_SPIKES_SHARE = 0.1
#: Weights of the periodic parts in what the per-step work leaves of the budget (``GRAD_SPIKES_SHARE`` of it when the
#: gradient monitor is on, or what it spends if more: ``OverheadBudget.shared_rate``; the logit part, an early warning,
#: always divides the budget less the reserve), normalised over the parts that are on: the Hessian is the headline
#: signal and the costliest, so it gets the largest share; each share caps that part's own spending, so no part can
#: starve another.
SHARE_WEIGHTS = {"hessian": 0.8, "rank": 0.1, "connectivity": 0.05, "logits": 0.13}
#: Budget mode's first estimate of a part's cost in training steps, for the bundle's configuration (one probe batch
#: for the Hessian and the barrier), measured cold on the reference workloads: top-1 Lanczos 18-128 steps, rank
#: 2-27, an interpolation 7-59. Near the typical cost rather than the worst, so that the first points of all parts
#: fit the ledger's advance together (the monitors' own, pessimistic, estimates would not); the ledger learns the
#: real cost from the first measurement on, and the advance absorbs the estimate's error.
FIRST_COST_STEPS = {"hessian": 40.0, "rank": 20.0, "connectivity": 25.0}
_PARTS = {
    "hessian": HessianMonitor,
    "grad_spikes": GradientSpikeMonitor,
    "logits": LogitMonitor,
    "rank": EffectiveRankMonitor,
    "connectivity": ModeConnectivityMonitor,
}


def _build(name: str, setting: Any, shared: dict[str, Any], probe: dict[str, Any]) -> LandscapeCallback:
    """The part ``name`` from its setting (``True`` or a dict of its arguments) and the bundle's arguments."""
    cls = _PARTS[name]
    if setting is not True and not isinstance(setting, dict):
        raise TypeError(f"`{name}` must be True, False or a dict of {cls.__name__} arguments, got {setting!r}.")
    arguments = dict(shared)
    if cls.takes_probe_set():
        arguments.update(probe)
        if name == "logits" or probe["num_probe_batches"] is None:
            arguments["num_probe_batches"] = DEFAULT_PROBE_BATCHES[name]  # see there; logits always reads one
    if name in DEFAULT_EVERY:
        arguments["every_n_steps"] = DEFAULT_EVERY[name]
    arguments.update(DEFAULT_ARGUMENTS.get(name, {}))
    arguments.update(setting if isinstance(setting, dict) else {})
    for own in ("rollback_every_n_steps", "max_rollbacks", "rollback_lr_factor"):
        if own in arguments:
            raise ValueError(
                f"`{name}` sets `{own}`, but the parts share one rollback keeper: pass `{own}` to "
                f"LandscapeMonitor itself (got {name}={setting!r})."
            )
    return cls(**arguments)


class LandscapeMonitor(Callback):
    """All monitors with one configuration: ``Trainer(callbacks=[LandscapeMonitor()])``.

    Each part is ``True`` (defaults), ``False`` (off), or a dict of that monitor's own arguments (for example
    ``hessian={"top_k": 3, "trace": True}``). The shared arguments given here (``loss_fn``, ``num_probe_batches``,
    ``mode``, ``on_alert``, ``prefix``, ``strict``, ``seed``) apply to every part that takes them; a part's dict
    overrides them. The parts log exactly the keys documented on each monitor.

    Default cadences: HessianMonitor, EffectiveRankMonitor and ModeConnectivityMonitor every 200 steps, LogitMonitor
    every 10 (one forward pass over one probe batch: the cheap early warning of attention-logit growth),
    GradientSpikeMonitor every step (it reads the step's own gradients; every few steps where the budget cannot
    afford that, see ``max_overhead``), all within a 5% overhead budget (``max_overhead``; measured in
    ``benchmarks/overhead.py``). Fast signals (gradient and loss z-scores, attention logits) and slow ones (curvature
    against the stability threshold, rank collapse, barriers) thus run side by side: the cheap ones every few steps,
    the expensive ones as often as the budget allows. The Hessian and the barrier use the first probe batch and the
    rank the first four (``DEFAULT_PROBE_BATCHES``) unless ``num_probe_batches`` is given.

    Args:
        hessian, grad_spikes, rank, connectivity, logits: the parts (``True`` / ``False`` / dict of arguments). The
            logits part reads one probe batch unless its dict sets ``num_probe_batches``.
        loss_fn, num_probe_batches, mode, on_alert, prefix, strict, seed: shared arguments (``num_probe_batches``
            ``None``: each part's ``DEFAULT_PROBE_BATCHES``).
        rollback_every_n_steps, max_rollbacks, rollback_lr_factor: the rollback keeper's (see
            :class:`~lightning_landscape.callbacks._base.LandscapeCallback`): the parts share one keeper, whose
            snapshot holds every part's state and is refreshed after all parts ran; a part's dict cannot set them.
        dashboard: write TensorBoard's custom-scalars "Landscape" dashboard once at the start of training.
        max_overhead: the parts share one time budget (default 5% of training time, planned over the run's length:
            the ledger may spend the budget of 2,000 training steps ahead, so that every part's first point comes
            within the first few dozen steps, and is back within the budget at the run's planned end; see
            :mod:`lightning_landscape.core.budget`). A due measurement waits until the parts' total cost fits
            (every hook's time is charged, the gradient monitor's per-step reads included), and each periodic part's
            own measurements after its first stay within its share of the budget, so that no part can starve
            another: the gradient monitor may take 10% of the budget (all of it when no periodic part shares the
            ledger), and the periodic parts split the rest by ``SHARE_WEIGHTS`` (Hessian 0.8, rank 0.1, barrier
            0.05, logits 0.13, renormalised over the parts that are on). Where reading the gradients every step
            costs more than its share (tiny models on CPU), the gradient monitor reads them every few steps and
            still scores the loss every step (see :class:`GradientSpikeMonitor`); what the per-step work still
            spends beyond its 10% comes out of the curvature parts' shares (Hessian, rank, barrier), so that the
            total fits, and not out of the logit part's (an early warning: ``budget_protected``). The cadences
            above are then the shortest spacing. On CUDA a measurement is charged its device time (CUDA events, one
            synchronisation at its end). ``None``: measure exactly at the cadences, read the gradients every step.

    Composition: the parts share one :class:`~lightning_landscape.callbacks._probes.ProbeSet` (captured here,
    once, with as many batches as the part that wants most; each part reads its first ``num_probe_batches``; one
    entry ``"_probe"`` in the checkpoint), one ``AlertDispatcher``, one set of once-only warnings and one time
    ledger, all handed to each part through :meth:`LandscapeCallback.attach`. Every Lightning hook a part
    overrides reaches it (the forwarding methods are built from ``Callback``'s hook names); per-step hooks skip the
    parts whose scheduler says they are idle.

    Raises:
        TypeError / ValueError: a part is not a bool or a dict, or one of its arguments is invalid (the message of
            the part's own validation names the argument).
    """

    def __init__(
        self,
        hessian: bool | dict[str, Any] = True,
        grad_spikes: bool | dict[str, Any] = True,
        rank: bool | dict[str, Any] = True,
        connectivity: bool | dict[str, Any] = True,
        logits: bool | dict[str, Any] = True,
        *,
        loss_fn: UserLossFn | None = None,
        num_probe_batches: int | None = None,
        mode: str = "eval",
        on_alert: OnAlert = "warn",
        prefix: str = "landscape",
        strict: bool = False,
        seed: int = 0,
        dashboard: bool = True,
        max_overhead: float | None = 0.05,
        rollback_every_n_steps: int = 50,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
    ) -> None:
        super().__init__()
        # one dispatcher for every part: one snapshot (of every part's state), one rollback counter
        self.alerting = AlertDispatcher(rollback_every_n_steps, max_rollbacks, rollback_lr_factor, prefix=prefix)
        self.alerting.snapshot_at_decisions = False  # after all parts ran (the bundle's hooks), not inside one
        settings = {
            "hessian": hessian,
            "grad_spikes": grad_spikes,
            "rank": rank,
            "connectivity": connectivity,
            "logits": logits,
        }
        shared = {"on_alert": on_alert, "prefix": prefix, "strict": strict, "seed": seed}
        probe = {"loss_fn": loss_fn, "num_probe_batches": num_probe_batches, "mode": mode}
        self.parts: dict[str, LandscapeCallback] = {
            name: _build(name, setting, shared, probe) for name, setting in settings.items() if setting is not False
        }
        # parts whose dict says `max_overhead=None`: exact cadences (the gradient monitor: every step), off the
        # shared ledger (a part built without a budget cannot otherwise be told from one left to the bundle's)
        self._off_budget = {
            name
            for name, setting in settings.items()
            if isinstance(setting, dict) and "max_overhead" in setting and setting["max_overhead"] is None
        }
        if not isinstance(dashboard, bool):
            raise TypeError(f"`dashboard` must be a bool, got {dashboard!r}.")
        self.dashboard = dashboard
        self.prefix = prefix
        # One ledger for every part (unless a part was given its own `max_overhead`): the sum of their costs is
        # what must fit, and cheap parts then get measured more often than expensive ones.
        self.max_overhead = max_overhead
        self.budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        #: The probe set of every part that reads one: as many batches as the part that wants most.
        self.probes = ProbeSet(
            max((p.num_probe_batches for p in self.parts.values() if p.takes_probe_set()), default=1)
        )
        self._warned: set[str] = set()  # warnings said once per bundle (shared with the parts)
        #: Each periodic part's weight in the budget (``SHARE_WEIGHTS``; :meth:`add_part` adds its own).
        self.share_weights = {name: SHARE_WEIGHTS[name] for name in self.parts if name in SHARE_WEIGHTS}
        # the bundle's first-cost estimates are for its own default configuration of a part, not a configured one
        self._first_cost = {n: c for n, c in FIRST_COST_STEPS.items() if n in self.parts and settings[n] is True}
        self._compose()

    def add_part(self, name: str, part: LandscapeCallback, *, share_weight: float = 0.15) -> None:
        """Compose one more monitor (a new kind of measurement) with the built-in parts, before ``fit``: it shares
        their probe set (the set grows to its ``num_probe_batches`` if needed), alert dispatcher, warnings and time
        ledger (unless it was given its own ``max_overhead``), with ``share_weight`` among the periodic parts'
        weights, and every Lightning hook it overrides reaches it.

        Raises:
            ValueError: ``name`` is taken, the probe capture has begun, or ``share_weight`` is not > 0.
            TypeError: ``part`` is not a LandscapeCallback.
        """
        if not isinstance(part, LandscapeCallback):
            raise TypeError(f"`part` must be a LandscapeCallback, got {type(part).__name__}.")
        if name in self.parts:
            raise ValueError(
                f"`name` must not be one of the parts already composed {sorted(self.parts)}, got {name!r}."
            )
        share_weight = check_float("share_weight", share_weight, minimum=0.0, strict_minimum=True)
        if self.probes.batches or self.probes.loaded is not None:
            raise ValueError(
                f"`add_part` must be called before training starts (the probe set is being captured), got {name!r}."
            )
        self.parts[name] = part
        if part.takes_probe_set():
            self.probes.size = max(self.probes.size, part.num_probe_batches)
        if not part.strides_rather_than_postpones:
            self.share_weights[name] = share_weight
        self._forget_hooks()
        self._state_key = None
        self._compose()

    def _compose(self) -> None:
        """Hand every part the shared pieces (:meth:`LandscapeCallback.attach`), with its budget share: a part that
        strides rather than postpones (the gradient monitor) may take ``GRAD_SPIKES_SHARE`` of the budget before it
        reads every few steps instead (alone on the ledger, all of it); the periodic parts share the rest by
        their ``share_weights``. A part built with its own ``max_overhead`` keeps its own ledger, and one whose dict
        says ``max_overhead=None`` has none (exact cadence)."""
        ledger = {
            n: p
            for n, p in self.parts.items()
            if self.budget is not None and p.budget in (None, self.budget) and n not in self._off_budget
        }
        periodic = [n for n, p in ledger.items() if not p.strides_rather_than_postpones]
        # The periodic parts' shares add up to 1 of what the per-step work leaves (OverheadBudget.shared_rate): the
        # gradient monitor's share kept for it, or what it spends if more (on the digits MLP 2.7% of training, the
        # share 0.5%: counted beside shares of the rest, the total ran out two thirds into a run).
        if self.budget is not None:
            self.budget.reserved_per_step = GRAD_SPIKES_SHARE if periodic and len(periodic) < len(ledger) else 0.0
        total_weight = sum(self.share_weights[n] for n in periodic)
        if self.budget is not None:
            self.budget.protected_share = sum(
                self.share_weights[n] / total_weight for n in periodic if self.parts[n].budget_protected
            )
        for name, part in self.parts.items():
            self.alerting.register(name, part)
            share = None
            if name in periodic:
                share = self.share_weights[name] / total_weight
            elif name in ledger and periodic:
                share = GRAD_SPIKES_SHARE
            part.attach(
                alerting=self.alerting,
                warned=self._warned,
                probes=self.probes if part.takes_probe_set() else None,
                budget=self.budget if name in ledger else None,
                budget_share=share,
                first_cost_steps=self._first_cost.get(name) if name in ledger else None,
            )

    # --------------------------------------------------------------------------------------------------- hooks
    # Every Callback hook is forwarded to the parts that override it (the methods are made below the class from
    # Callback's hook names, so a hook a part starts to use needs no edit here; plain functions on the class, so
    # the callback pickles for ddp_spawn). The ones written out here add the bundle's own work.
    def _implementing(self, hook: str) -> list[tuple[LandscapeCallback, Callable[..., Any]]]:
        """``(part, bound hook method)`` of the parts that implement ``hook``, skipping parts that inherit
        Lightning's no-op (cached: per-step hooks are called thousands of times)."""
        cache = self.__dict__.setdefault("_hook_cache", {})
        if hook not in cache:
            default = getattr(Callback, hook)
            cache[hook] = [
                (p, getattr(p, hook))
                for p in self.parts.values()
                if getattr(type(p), hook) is not default and p.needs_hook(hook)
            ]
        return cache[hook]

    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> None:
        parts = self._implementing(hook)
        if parts:
            self._call(parts, *args, **kwargs)

    def _call(self, parts: list[tuple[LandscapeCallback, Callable[..., Any]]], *args: Any, **kwargs: Any) -> None:
        if self.budget is None:
            for _, method in parts:
                method(*args, **kwargs)
            return
        # the ledger sees all of the parts' time, bookkeeping included (a section without its context manager)
        started = self.budget.open_section()
        try:
            for _, method in parts:
                method(*args, **kwargs)
        finally:
            self.budget.close_section(started)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_hook_cache", None)  # bound methods: rebuilt after unpickling (ddp_spawn pickles callbacks)
        state.pop("_batch_start_parts", None)
        for hook in FORWARDED_HOOKS:  # the skips a forwarder installed (see _forwarder): found again when called
            state.pop(hook, None)
        return state

    def _forget_hooks(self) -> None:
        """The parts changed: which part implements which hook is decided again at the next call."""
        self.__dict__.pop("_hook_cache", None)
        self.__dict__.pop("_batch_start_parts", None)
        for hook in FORWARDED_HOOKS:
            self.__dict__.pop(hook, None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dashboard:
            tb.write_dashboard(trainer, self.prefix)
        self._forward("on_train_start", trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only the parts with something to do at this step (a due or postponed measurement): most steps none of the
        # periodic parts has, and skipping their calls is most of the bundle's per-step saving.
        step = trainer.global_step
        capture = (not self.probes.complete or self.probes.loaded is not None) and self._reads_probes()
        parts = self.__dict__.get("_batch_start_parts")
        if parts is None:  # (part, hook, schedule): the schedule's idle_until read inline, not through a call
            parts = self._batch_start_parts = [
                (p, m, p.schedule) for p, m in self._implementing("on_train_batch_start")
            ]
        active = [(p, m) for p, m, schedule in parts if step >= schedule.idle_until]
        if capture:
            if self.budget is None:
                self._capture(trainer, batch)
            else:
                with self.budget.section():
                    self.budget.start(step)
                    self._capture(trainer, batch)
        if active:
            self._call(active, trainer, pl_module, batch, batch_idx)
        self._safe_point(trainer)  # after every part's check of this step

    def _reads_probes(self) -> bool:
        # (the gradient monitor alone keeps no probe set)
        return any(part.probes is self.probes for part in self.parts.values())

    def _capture(self, trainer: pl.Trainer, batch: Any) -> None:
        """The shared probe set: a checkpoint's applied at the first batch, then this batch kept until complete."""
        if self.probes.loaded is not None:
            self.probes.restore_loaded(trainer.world_size, trainer.global_rank, type(self).__name__, self._warn_once)
        self.probes.capture(trainer.world_size, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._forward("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        self._safe_point(trainer)

    def _safe_point(self, trainer: pl.Trainer) -> None:
        """The shared keeper's snapshot refresh or rollback; its time is charged to the budget like a part's."""
        if not self.alerting.rollback_enabled:
            return
        if self.budget is None:
            self.alerting.safe_point(trainer)
            return
        with self.budget.section():
            self.alerting.safe_point(trainer)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=LandscapeWarning)

    # ---------------------------------------------------------------------------------------------- results
    @property
    def alerts(self) -> list[Alert]:
        """Every alert raised so far by every part, in step order."""
        return sorted((a for part in self.parts.values() for a in part.alerts), key=lambda a: a.step)

    @property
    def last_metrics(self) -> dict[str, float]:
        """The latest values logged by every part."""
        merged: dict[str, float] = {}
        for part in self.parts.values():
            merged.update(part.last_metrics)
        return merged

    # ------------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Lightning reads it on every hook call (profiler action names): computed once.
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(prefix=self.prefix, parts=sorted(self.parts))
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        """Every part's state under its name, the shared probe set once under ``"_probe"``, the shared rollback
        keeper (its snapshot) under ``"_alerting"`` when a part rolls back."""
        state: dict[str, Any] = {name: part.state_dict() for name, part in self.parts.items()}
        state["_probe"] = self.probes.state_dict()
        if self.alerting.rollback_enabled:
            state["_alerting"] = self.alerting.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also reads checkpoints written before the probe set was shared (a probe set in every part's state): the
        longest part's set becomes the shared one (they were all the first batches of the same run)."""
        probe = state_dict.get("_probe")
        if probe is None:
            probe = migrate_part_probes([s for n, s in state_dict.items() if n in self.parts and isinstance(s, dict)])
        if probe is not None:
            self.probes.load_state_dict(probe)
        for name, part in self.parts.items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])
        if "_alerting" in state_dict:
            self.alerting.load_state_dict(state_dict["_alerting"])


#: The Callback hooks forwarded to the parts: every hook Lightning's ``Callback`` defines (state hooks excepted:
#: the bundle's state is its own, composed of the parts').
FORWARDED_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value) and (name.startswith("on_") or name in ("setup", "teardown"))
)


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A forwarded hook that no part needs."""


def _forwarder(hook: str) -> Callable[..., None]:
    def forward(self: LandscapeMonitor, *args: Any, **kwargs: Any) -> None:
        parts = self._implementing(hook)
        if parts:
            self._call(parts, *args, **kwargs)
        else:
            # no part has work in this hook: later calls (every step, for the per-step hooks) find a no-op on the
            # instance instead of this forwarder (dropped when the parts change, and when pickled)
            self.__dict__[hook] = _nothing

    forward.__name__ = hook
    forward.__qualname__ = f"LandscapeMonitor.{hook}"
    forward.__doc__ = f"Forward ``{hook}`` to the parts that implement it."
    return forward


for _hook in FORWARDED_HOOKS:
    if _hook not in vars(LandscapeMonitor):
        setattr(LandscapeMonitor, _hook, _forwarder(_hook))
