"""LandscapeMonitor: every monitor behind one callback and one configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._alerting import AlertDispatcher
from lightning_landscape.callbacks._base import LandscapeCallback, OnAlert, UserLossFn
from lightning_landscape.callbacks.connectivity import ModeConnectivityMonitor
from lightning_landscape.callbacks.grad_spikes import GradientSpikeMonitor
from lightning_landscape.callbacks.hessian import HessianMonitor
from lightning_landscape.callbacks.logits import LogitMonitor
from lightning_landscape.callbacks.rank import EffectiveRankMonitor
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.budget import OverheadBudget

# Default cadence of each part, in optimizer steps (the gradient monitor runs every step).
DEFAULT_EVERY = {"hessian": 200, "rank": 200, "connectivity": 200, "logits": 10}
#: Probe batches of each part when ``num_probe_batches`` is not given: one for the Hessian and the barrier (a
#: Hessian-vector product or an interpolation point is a pass over the probe set, so one batch is 2-4x cheaper
#: on the CNN and the transformer, see benchmarks/RESULTS.md), four for the rank (a rank needs more samples than
#: features: 4 x 64 examples for a 256-wide layer), one for the logits (every few steps).
DEFAULT_PROBE_BATCHES = {"hessian": 1, "rank": 4, "connectivity": 1, "logits": 1}
#: Share of the bundle's budget the gradient monitor's every-step reads may take (see GradientSpikeMonitor.stride).
GRAD_SPIKES_SHARE = 0.1
#: Weights of the periodic parts in the rest of the budget (``1 - GRAD_SPIKES_SHARE`` when the gradient monitor is
#: on), normalised over the parts that are on: the Hessian is the headline signal and the costliest, so it gets
#: the largest share; each share caps that part's own spending, so no part can starve another.
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
            another: the gradient monitor may take 20% of the budget (all of it when no periodic part shares the
            ledger), and the periodic parts split the rest by ``SHARE_WEIGHTS`` (Hessian 0.7, rank, barrier and
            logits 0.15 each, renormalised over the parts that are on). Where reading the gradients every step costs
            more than its share (tiny models on CPU), the gradient monitor reads them every few steps and still
            scores the loss every step (see :class:`GradientSpikeMonitor`). The cadences above are then the
            shortest spacing. On CUDA a measurement is charged its device time (CUDA events, one synchronisation at
            its end). ``None``: measure exactly at the cadences, read the gradients every step.

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
        shared = {"on_alert": on_alert, "prefix": prefix, "strict": strict, "seed": seed}
        probe = {"loss_fn": loss_fn, "num_probe_batches": num_probe_batches, "mode": mode}
        self.parts: dict[str, LandscapeCallback] = {}
        parts_settings = {
            "hessian": hessian,
            "grad_spikes": grad_spikes,
            "rank": rank,
            "connectivity": connectivity,
            "logits": logits,
        }
        for name, setting in parts_settings.items():
            if setting is False:
                continue
            if setting is not True and not isinstance(setting, dict):
                raise TypeError(
                    f"`{name}` must be True, False or a dict of {_PARTS[name].__name__} arguments, got {setting!r}."
                )
            arguments = dict(shared)
            if name != "grad_spikes":
                arguments.update(probe)
                arguments["every_n_steps"] = DEFAULT_EVERY[name]
            if name == "logits" or (name != "grad_spikes" and num_probe_batches is None):
                arguments["num_probe_batches"] = DEFAULT_PROBE_BATCHES[name]  # see there; logits always reads one
            arguments.update(setting if isinstance(setting, dict) else {})
            for own in ("rollback_every_n_steps", "max_rollbacks", "rollback_lr_factor"):
                if own in arguments:
                    raise ValueError(
                        f"`{name}` sets `{own}`, but the parts share one rollback keeper: pass `{own}` to "
                        f"LandscapeMonitor itself (got {name}={setting!r})."
                    )
            self.parts[name] = _PARTS[name](**arguments)
            self.parts[name].alerting = self.alerting
            self.alerting.register(name, self.parts[name])
        if not isinstance(dashboard, bool):
            raise TypeError(f"`dashboard` must be a bool, got {dashboard!r}.")
        # One ledger for every part (unless a part was given its own `max_overhead`): the sum of their costs is
        # what must fit, and cheap parts then get measured more often than expensive ones.
        self.max_overhead = max_overhead
        self.budget = OverheadBudget(max_overhead) if max_overhead is not None else None
        warned: set[str] = set()
        sharing = {}
        for name, part in self.parts.items():
            part._shared_warned = warned
            own = isinstance(parts_settings[name], dict) and "max_overhead" in parts_settings[name]
            if self.budget is not None and not own:
                part.budget = self.budget
                if name != "grad_spikes":  # it strides rather than postpones: its own share, below
                    sharing[name] = part
                    if name in FIRST_COST_STEPS and not isinstance(parts_settings[name], dict):
                        part.first_cost_steps = FIRST_COST_STEPS[name]
        spikes = self.parts.get("grad_spikes")
        spikes_shares = spikes is not None and spikes.budget is self.budget and bool(sharing)
        # the gradient monitor's per-step reads may take 20% of the budget before it reads every few steps instead
        # (alone on the ledger, all of it); the periodic parts share the rest by weight
        rest = 1.0 - GRAD_SPIKES_SHARE if spikes_shares else 1.0
        total_weight = sum(SHARE_WEIGHTS[name] for name in sharing)
        for name, part in sharing.items():
            part.budget_share = rest * SHARE_WEIGHTS[name] / total_weight
        if spikes_shares:
            spikes.budget_share = GRAD_SPIKES_SHARE
        self.dashboard = dashboard
        self.prefix = prefix

    # Hooks: forwarded to every part, in a fixed order (explicit methods, so the callback pickles for ddp_spawn).
    def _implementing(self, hook: str) -> list[tuple[LandscapeCallback, Callable[..., Any]]]:
        """``(part, bound hook method)`` of the parts that implement ``hook``, skipping parts that inherit
        Lightning's no-op (cached: per-step hooks are called thousands of times)."""
        cache = self.__dict__.setdefault("_hook_cache", {})
        if hook not in cache:
            default = getattr(Callback, hook)
            cache[hook] = [(p, getattr(p, hook)) for p in self.parts.values() if getattr(type(p), hook) is not default]
        return cache[hook]

    def _forward(self, hook: str, *args: Any) -> None:
        self._call(self._implementing(hook), *args)

    def _call(self, parts: list[tuple[LandscapeCallback, Callable[..., Any]]], *args: Any) -> None:
        if self.budget is None:
            for _, method in parts:
                method(*args)
            return
        with self.budget.section():  # the ledger sees all of the parts' time, bookkeeping included
            for _, method in parts:
                method(*args)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_hook_cache", None)  # bound methods: rebuilt after unpickling (ddp_spawn pickles callbacks)
        return state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward("setup", trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dashboard:
            tb.write_dashboard(trainer, self.prefix)
        self._forward("on_train_start", trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only the parts with something to do at this step (a due or postponed measurement, probe capture): most
        # steps none of the periodic parts has, and skipping their calls is most of the bundle's per-step saving.
        step = trainer.global_step
        active = [pair for pair in self._implementing("on_train_batch_start") if step >= pair[0].idle_until]
        if active:
            self._call(active, trainer, pl_module, batch, batch_idx)
        self._safe_point(trainer)  # after every part's check of this step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._forward("on_before_optimizer_step", trainer, pl_module, optimizer)

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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_end", trainer, pl_module)

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

    @property
    def state_key(self) -> str:
        # Lightning reads it on every hook call (profiler action names): computed once.
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(prefix=self.prefix, parts=sorted(self.parts))
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: part.state_dict() for name, part in self.parts.items()}
        if self.alerting.rollback_enabled:  # the shared rollback keeper (its snapshot), once
            state["_alerting"] = self.alerting.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])
        if "_alerting" in state_dict:
            self.alerting.load_state_dict(state_dict["_alerting"])
