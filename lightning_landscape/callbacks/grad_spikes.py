"""GradientSpikeMonitor: gradient-norm, loss and update-size spikes and divergence, every optimizer step."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_landscape.callbacks._base import LandscapeCallback, is_sharded
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int
from lightning_landscape.core.alerts import Alert, ConsecutiveAboveRule
from lightning_landscape.core.divergence import DivergenceRule
from lightning_landscape.core.params import top_level_blocks
from lightning_landscape.core.spikes import SPIKE_UPDATES, EMAZScore

# Kinds of optimizer step, for budget mode's cost tallies.
_SKIPPED, _READ, _LOGGED = range(3)
_COMPILED = "_orig_mod."  # torch.compile's wrapper inserts this into parameter names


@dataclass
class _Stream:
    """One optimizer's gradient statistics (manual optimization with several optimizers keeps one each)."""

    detector: EMAZScore
    growth: ConsecutiveAboveRule | None
    divergence: DivergenceRule | None
    bad: bool = False  # inside a non-finite excursion (non_finite fires on entering it, once)
    overflow_run: int = 0  # consecutive steps a GradScaler skipped
    # cached per fit: (number of parameters in the optimizer, names, parameters)
    params: tuple[int, list[str], list[torch.nn.Parameter]] | None = None
    group_names: list[str] = field(default_factory=list)
    group_members: list[list[int]] = field(default_factory=list)
    resolved: list[str] | None = None
    norm_dtype: dict[str, torch.dtype] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "growth": self.growth.state_dict() if self.growth is not None else None,
            "divergence": self.divergence.state_dict() if self.divergence is not None else None,
            "bad": self.bad,
            "overflow_run": self.overflow_run,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.growth is not None and state.get("growth") is not None:
            self.growth.load_state_dict(state["growth"])
        if self.divergence is not None and state.get("divergence") is not None:
            self.divergence.load_state_dict(state["divergence"])
        self.bad = bool(state.get("bad", False))
        self.overflow_run = int(state.get("overflow_run", 0))


@dataclass
class _Read:
    """One optimizer's gradients at one step: squared per-tensor norms (host floats, or a device tensor awaiting
    readback), and once scored, the values that are logged."""

    stream: int
    squares: list[float] | Tensor
    scored: dict[str, Any] | None = None
    # logged steps: (<g, theta>, ||theta||^2) for ``nlm_alignment`` (host floats, or a device tensor awaiting readback)
    nlm: tuple[float, float] | Tensor | None = None


@dataclass
class _Step:
    """One optimizer step from its first gradient read to its scoring (one record for host and device alike)."""

    step: int
    weight: float = 1.0  # samples of this step over the usual number (a remainder batch is a fraction)
    reads: list[_Read] = field(default_factory=list)
    loss: Tensor | float | None = None
    update: tuple[Tensor, Tensor] | None = None
    logged: bool = False


#: Base-class arguments that do not apply to this monitor, with the base's defaults (accepted only at these).
_NOT_APPLICABLE = {"loss_fn": None, "num_probe_batches": 4, "mode": "eval"}


class GradientSpikeMonitor(LandscapeCallback):
    """Global and per-layer gradient norms, the training loss and the size of the applied update, with spike and
    divergence alerts.

    Every optimizer step the global gradient norm is read in ``on_before_optimizer_step`` (after AMP unscaling and
    DDP's all-reduce, before Lightning's gradient clipping) and scored by an EMA z-score on the log scale
    (:class:`~lightning_landscape.core.spikes.EMAZScore`; ZClip's statistic, tuned for alerting). The loss of the
    step (averaged over ranks) is scored the same way. Both also feed a slow divergence rule
    (:class:`~lightning_landscape.core.divergence.DivergenceRule`). One path for every device: the norms are computed
    where the gradients live; on the CPU they are read at once (alerts about a step's gradients come in
    ``on_before_optimizer_step``, before the update is applied), on an accelerator they stay on the device and are
    read back every logged step in one transfer (no host sync per step), so an alert can come up to
    ``every_n_steps - 1`` steps after the step it names.

    Logged metrics (``p`` = ``prefix``; at Lightning's logging steps, ``(step + 1) % every_n_steps == 0`` as for
    ``self.log``, and at every event):
        - ``p/grad/norm``, ``p/grad/zscore``, ``p/grad/spike`` (0/1), ``p/grad/norm/{group}`` per layer group
          (``torch.compile``'s ``_orig_mod.`` removed from the names).
        - ``p/grad/nlm_alignment``: ``cos(-g, theta) = -<g, theta> / (||g|| ||theta||)`` over the parameters and the
          gradients of ``p/grad/norm`` (after unscaling, before any clipping; clipping multiplies by a scalar and
          leaves it unchanged), at the logged steps only. For a positively homogeneous network (ReLU layers
          without biases or normalisation gains) ``theta`` itself is the naive-loss-minimisation direction, which
          only scales the logits: a value near 1 means the step mostly grows the weights along themselves, the
          precursor of softmax collapse (Prieto et al.); near 0 the update turns the weights; negative, it
          shrinks them (weight decay winning). 0 when the gradient or the parameters are zero, NaN when the
          gradient is not finite, absent at GradScaler overflow steps and under sharded strategies (FSDP,
          DeepSpeed: the shard-wise terms would need a collective of their own; not done yet).
        - ``p/grad/level``, ``p/grad/rise``; ``p/loss/level``, ``p/loss/rise``: the divergence rule's slow level and
          its ratio to the recent best.
        - ``p/loss/value``, ``p/loss/zscore``, ``p/loss/spike`` (0/1), when ``watch_loss``.
        - ``p/update/norm`` (norm of the parameter change the optimizer applied) and ``p/update/ratio`` (over the
          parameter norm), when ``track_update`` (measured at the logged steps only).
        - ``p/grad/clipped``: how many steps ``clip=True`` acted on so far.
        - ``p/grad/overflow_steps``: under a GradScaler (``precision="16-mixed"``), how many steps it skipped so far.
        - ``p/events/grad_spike``, ``p/events/loss_spike``: the z-score, logged only at spike steps (a sparse tag
          TensorBoard's sampling cannot drop).
        - ``p/grad/stride``: budget mode only, every how many steps the gradients are read (see below).
        - Manual optimization with several optimizers: optimizer ``i > 0`` (its position in
          ``trainer.optimizers``) logs the same gradient keys under ``p/grad/optimizer_{i}/...``; each optimizer's
          gradients (only its own parameters) have their own detector. Steps are Lightning's logging steps.

    Alerts:
        - ``grad_spike``, ``loss_spike``: z above ``z_threshold``.
        - ``divergence``: the slow level of the loss (log scale, EMA over ``divergence_steps`` steps, each batch
          weighted by its size, each step's move capped at 2x) has risen more than ``divergence_ratio`` times above
          its lowest point of the last ``divergence_horizon`` steps (the gradient norm likewise, with
          ``grad_divergence_ratio``). The spike rules adapt to a gradual rise; this one does not.
        - ``grad_growth``: the gradient z-score stayed above ``growth_z`` for ``growth_patience`` consecutive steps.
        - ``non_finite``: a NaN/inf gradient norm or loss, once per excursion (it re-arms at the next finite value).
          Under a GradScaler a non-finite gradient is a routine overflow step (the scaler skips it and lowers its
          scale): it is counted, and ``non_finite`` fires only after ``max_overflow_steps`` consecutive skips.

    Batches far below the usual size (fewer than ``min_batch_fraction`` of the largest number of samples a step has
    seen, e.g. the remainder batch at an epoch end) are not scored by the spike detectors (their norms and losses
    are noisier, not anomalous) and weigh in the divergence level by their size.

    Cost per step: one fused norm pass over the gradients in float32 (``torch._foreach_norm``) and a few float
    operations; no host sync between readbacks on accelerators, except with ``clip=True``, which must decide before
    the optimizer step and so reads the norm back every step (as ZClip does). ``track_update`` copies the
    parameters once per logged step. ``nlm_alignment``, per logged step: one dot product per parameter tensor and one
    fused norm pass over the parameters (both on the device, read back with the norms: no extra transfer). On CPU
    that is ~0.05-0.15 ms a step.

    Budget mode (``max_overhead``; ``LandscapeMonitor`` gives this monitor 20% of its budget): the hooks' time is
    charged every step, and at every logged step the monitor checks that reading the gradients every step fits its
    share of the budget. When it does not, it reads them every ``stride``-th step (and at every logged step, and at
    every step until the detector's warm-up is done, so spike detection starts after ``warmup_steps`` steps whatever
    the stride), warns once and logs ``p/grad/stride``. The loss is still scored at every step (a skipped step's loss
    with the next reading step, in one batch; its alerts name its own step). ``clip=True`` always reads every step.

    Args:
        z_threshold: z above which a value is a spike (ZClip clips at 2.5; alerts need more, see core/spikes.py).
        warmup_steps: steps that initialise the statistics; nothing is flagged before.
        clip: clip a spiking gradient back to the norm at ``z = z_threshold`` before the optimizer step (ZClip-style
            mitigation, off by default). Steps without a spike are untouched bitwise. After a lasting level shift
            the baseline re-anchors (``reanchor_steps``), so clipping never becomes a permanent learning-rate cut.
        alpha: EMA decay.
        spike_update: how a spike enters the baseline: ``"skip"`` (default), ``"clip"`` (ZClip's) or ``"raw"``.
        reanchor_steps: after this many consecutive spikes the baseline moves to the new level (``None``: never).
        groups: ``None`` for the top-level blocks of the model (looking through a wrapper such as ``self.net``),
            ``False`` for none, or ``{name: regex}`` matched against parameter names (each must match a parameter,
            checked at ``setup``).
        watch_loss: also score the training loss.
        loss_log_scale: score ``log(loss)``; set False for a loss that can be zero or negative (the loss divergence
            rule, a ratio, is then off).
        track_update: also log the size of the applied update.
        growth_z, growth_patience: the ``grad_growth`` rule (``growth_z=None`` turns it off).
        divergence_ratio: the loss divergence rule's ratio (``None``: off).
        grad_divergence_ratio: the gradient-norm divergence rule's ratio (``None``: off). Larger than the loss's:
            gradient norms wander by several times in healthy runs.
        divergence_steps: the divergence level's EMA time constant, in steps.
        divergence_horizon: how many steps back the best level is looked for.
        min_batch_fraction: steps with fewer samples than this fraction of the usual are not spike-scored.
        max_overflow_steps: consecutive GradScaler skips after which ``non_finite`` fires.
        every_n_steps: readback and logging cadence; ``None`` uses the Trainer's ``log_every_n_steps``.
        **kwargs: ``on_alert``, ``prefix``, ``strict``, ``alert_cooldown_steps`` of
            :class:`~lightning_landscape.callbacks._base.LandscapeCallback`. (``loss_fn``, ``num_probe_batches``
            and ``mode`` do not apply: this monitor reads the training step's own gradients and loss.)

    References: Kumar et al. 2025 (ZClip, arXiv 2504.02507); Wortsman et al. 2023 ("Small-scale proxies for
    large-scale Transformer training instabilities"); Prieto et al. 2025 ("Grokking at the Edge of Numerical
    Stability", arXiv 2501.04697: the NLM direction and softmax collapse).
    """

    # reads the training step's own forward/gradients; no loss evaluation of its own
    needs_loss = False

    group = "grad"

    def __init__(
        self,
        z_threshold: float = 5.0,
        warmup_steps: int = 50,
        clip: bool = False,
        *,
        alpha: float = 0.97,
        spike_update: str = "skip",
        reanchor_steps: int | None = 10,
        groups: Mapping[str, str] | bool | None = None,
        watch_loss: bool = True,
        loss_log_scale: bool = True,
        track_update: bool = True,
        growth_z: float | None = 2.5,
        growth_patience: int = 3,
        divergence_ratio: float | None = 1.15,
        grad_divergence_ratio: float | None = 5.0,
        divergence_steps: float = 7.0,
        divergence_horizon: int = 1000,
        min_batch_fraction: float = 0.5,
        max_overflow_steps: int = 50,
        every_n_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Accepted at the base class's defaults only: LightningCLI (jsonargparse) passes every inherited argument,
        # defaults included, and a config must round-trip.
        for name, default in _NOT_APPLICABLE.items():
            if name in kwargs and kwargs[name] != default:
                raise TypeError(
                    f"GradientSpikeMonitor does not take `{name}`: it reads the training step's own gradients and loss "
                    f"(got {name}={kwargs[name]!r})."
                )
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=1)
        super().__init__(every_n_steps=every_n_steps or 1, **kwargs)
        self._every = every_n_steps
        self.z_threshold = check_float("z_threshold", z_threshold, minimum=0.0, strict_minimum=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.clip = check_bool("clip", clip)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.spike_update = check_choice("spike_update", spike_update, SPIKE_UPDATES)
        self.reanchor_steps = None if reanchor_steps is None else check_int("reanchor_steps", reanchor_steps, minimum=1)
        if groups is not None and groups is not False and not isinstance(groups, Mapping):
            raise TypeError(f"`groups` must be None, False or a mapping of group name to regex, got {groups!r}.")
        if isinstance(groups, Mapping):
            for name, pattern in groups.items():
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(
                        f"`groups[{name!r}]` must be a valid regular expression, got {pattern!r}."
                    ) from err
        self.groups = groups
        self.watch_loss = check_bool("watch_loss", watch_loss)
        self.loss_log_scale = check_bool("loss_log_scale", loss_log_scale)
        self.track_update = check_bool("track_update", track_update)
        self.growth_z = (
            None if growth_z is None else check_float("growth_z", growth_z, minimum=0.0, strict_minimum=True)
        )
        self.growth_patience = check_int("growth_patience", growth_patience, minimum=1)
        self.divergence_ratio = (
            None
            if divergence_ratio is None
            else check_float("divergence_ratio", divergence_ratio, minimum=1.0, strict_minimum=True)
        )
        self.grad_divergence_ratio = (
            None
            if grad_divergence_ratio is None
            else check_float("grad_divergence_ratio", grad_divergence_ratio, minimum=1.0, strict_minimum=True)
        )
        self.divergence_steps = check_float("divergence_steps", divergence_steps, minimum=1.0)
        self.divergence_horizon = check_int("divergence_horizon", divergence_horizon, minimum=1)
        self.min_batch_fraction = check_float("min_batch_fraction", min_batch_fraction, minimum=0.0, maximum=1.0)
        self.max_overflow_steps = check_int("max_overflow_steps", max_overflow_steps, minimum=1)
        self._streams = [self._new_stream()]
        self.loss_detector = self._detector(log_scale=self.loss_log_scale)
        self.loss_divergence = (
            self._divergence(self.divergence_ratio)
            if self.divergence_ratio is not None and self.loss_log_scale
            else None
        )
        self._loss_bad = False
        self.clip_count = 0
        self.overflow_count = 0
        self._usual_samples = 0  # the largest number of samples an optimizer step has seen
        self._waiting: list[_Step] = []  # steps awaiting scoring (accelerators: until the next readback)
        self._open: _Step | None = None  # the step whose gradients are being read
        self._optimizer: Optimizer | None = None
        self._samples = (-1, 0)  # (step, samples of its micro-batches so far)
        self._snapshot: tuple[list[torch.nn.Parameter], list[Tensor]] | None = None
        self._names: dict[int, str] | None = None  # parameter id -> name, per fit
        self._sharded = False
        self._world_size = 1
        self._host = True  # the gradients live on the CPU: read at once
        self._defer = False  # tests: read back as on an accelerator
        self._fired = False  # an alert at this step so far (for on_alert="stop")
        self._current: tuple[int, Any] | None = None  # (step, None if budget mode skipped its gradients)
        self._scaler: Any = None  # the fit's GradScaler (16-mixed), if any
        self._optimizers: list[Optimizer] = []
        self._loss_sum: Tensor | None = None  # micro-batch losses of the step (gradient accumulation)
        self._reset_stride()

    # ------------------------------------------------------------------------------------------------- parts
    def _detector(self, log_scale: bool = True) -> EMAZScore:
        return EMAZScore(
            alpha=self.alpha,
            z_threshold=self.z_threshold,
            warmup_steps=self.warmup_steps,
            spike_update=self.spike_update,
            reanchor_steps=self.reanchor_steps,
            log_scale=log_scale,
        )

    def _divergence(self, ratio: float) -> DivergenceRule:
        return DivergenceRule(ratio=ratio, time_constant=self.divergence_steps, horizon=self.divergence_horizon)

    def _new_stream(self) -> _Stream:
        return _Stream(
            detector=self._detector(),
            growth=ConsecutiveAboveRule(self.growth_z, self.growth_patience) if self.growth_z is not None else None,
            divergence=self._divergence(self.grad_divergence_ratio) if self.grad_divergence_ratio is not None else None,
        )

    @property
    def grad_detector(self) -> EMAZScore:
        """The gradient-norm detector (of the first optimizer)."""
        return self._streams[0].detector

    @property
    def growth_rule(self) -> ConsecutiveAboveRule | None:
        """The ``grad_growth`` rule (of the first optimizer); ``None`` when ``growth_z=None``."""
        return self._streams[0].growth

    @property
    def _deferred_losses(self) -> list[tuple[int, Tensor | float | None]]:
        """Losses of the steps whose gradients budget mode skipped, not scored yet."""
        return [(s.step, s.loss) for s in self._waiting if not s.reads]

    def _reset_stride(self) -> None:
        """Stride 1 and empty cost tallies (at construction and at every fit start, when the ledger restarts)."""
        #: Budget mode: the gradients are read every ``stride``-th step (and at every logged step). 1 unless reading
        #: them every step would by itself take more than ``budget_share`` of the budget; the loss is scored every
        #: step regardless. Re-decided at every logged step from the measured costs.
        self.stride = 1
        # seconds and count of the steps of each kind: skipped (loss only), read (gradients), logged (read + logged)
        self._step_costs = {kind: [0.0, 0] for kind in (_SKIPPED, _READ, _LOGGED)}
        self._step_seconds = 0.0  # this step's hook time so far
        self._drain_seconds = 0.0  # of which scoring skipped steps' losses

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "grad_detector": self.grad_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "clip_count": self.clip_count,
            "growth_rule": self.growth_rule.state_dict() if self.growth_rule is not None else None,
            "streams": [stream.state_dict() for stream in self._streams],
            "loss_divergence": self.loss_divergence.state_dict() if self.loss_divergence is not None else None,
            "loss_bad": self._loss_bad,
            "overflow_count": self.overflow_count,
            "usual_samples": self._usual_samples,
            # losses of steps budget mode skipped, not scored yet (a checkpoint can fall between reading steps)
            "deferred_losses": [
                (s.step, None if s.loss is None else float(s.loss), s.weight) for s in self._waiting if not s.reads
            ],
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        streams = state.get("streams")
        if streams:
            self._streams = [self._new_stream() for _ in streams]
            for stream, stream_state in zip(self._streams, streams, strict=True):
                stream.load_state_dict(stream_state)
        elif "grad_detector" in state:  # a checkpoint of an earlier version
            self.grad_detector.load_state_dict(state["grad_detector"])
            if self.growth_rule is not None and state.get("growth_rule") is not None:
                self.growth_rule.load_state_dict(state["growth_rule"])
        if "loss_detector" in state:
            self.loss_detector.load_state_dict(state["loss_detector"])
        if self.loss_divergence is not None and state.get("loss_divergence") is not None:
            self.loss_divergence.load_state_dict(state["loss_divergence"])
        self._loss_bad = bool(state.get("loss_bad", False))
        self.clip_count = int(state.get("clip_count", 0))
        self.overflow_count = int(state.get("overflow_count", 0))
        self._usual_samples = int(state.get("usual_samples", 0))
        self._waiting = [
            _Step(int(item[0]), weight=float(item[2]) if len(item) > 2 else 1.0, loss=item[1])
            for item in state.get("deferred_losses", [])
        ]

    # ------------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if isinstance(self.groups, Mapping):
            names = [n.replace(_COMPILED, "") for n, _ in pl_module.named_parameters()]
            for name, pattern in self.groups.items():
                if not any(re.search(pattern, n) for n in names):
                    raise ValueError(
                        f"`groups[{name!r}]` = {pattern!r} matches no parameter of {type(pl_module).__name__} "
                        f"(its names look like {names[:3]})."
                    )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        for stream in self._streams:
            stream.params = stream.resolved = None  # the model may sit elsewhere than in the previous fit
        self._names = None
        self._sharded = is_sharded(trainer.strategy)
        self._world_size = trainer.world_size
        # fixed for the fit (property walks through the strategy cost microseconds a step)
        self._scaler = _scaler(trainer)
        self._optimizers = list(trainer.optimizers)
        # a step left half-done by an earlier fit that failed is not this fit's; deferred losses from before this
        # fit's first step came from the checkpoint it resumes (kept), later ones from an earlier fit (dropped)
        self._open, self._snapshot, self._current = None, None, None
        self._samples = (-1, 0)
        # (global_step: restored from the checkpoint already; Lightning's logging step is re-derived only later)
        self._waiting = [s for s in self._waiting if not s.reads and s.step < trainer.global_step]
        self._reset_stride()  # budget mode decides the stride afresh in every fit, from this fit's costs

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Counts the samples of the step (its hooks' time is charged to the budget); no probe set."""
        started = time.perf_counter()
        step = self._step(trainer)
        samples = _batch_size(batch)
        self._samples = (step, samples + (self._samples[1] if self._samples[0] == step else 0))
        if self.budget is not None:
            self.budget.start(step)
            self.budget.charge(time.perf_counter() - started)

    @staticmethod
    def _step(trainer: pl.Trainer) -> int:
        """Lightning's logging step: optimizer steps under automatic optimization, batches under manual (where
        ``global_step`` advances at every ``optimizer.step()``)."""
        try:
            return trainer.fit_loop.epoch_loop._batches_that_stepped
        except AttributeError:
            return trainer.global_step

    def _every_n(self, trainer: pl.Trainer) -> int:
        return self._every or max(1, trainer.log_every_n_steps)

    def _is_logged_step(self, trainer: pl.Trainer, step: int) -> bool:
        # Lightning's convention (`self.log` lands at steps 9, 19, ... for log_every_n_steps=10)
        return (step + 1) % self._every_n(trainer) == 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        started = time.perf_counter() if self.budget is not None else 0.0
        self._optimizer = optimizer
        self._read_gradients(trainer, pl_module)
        if self.budget is not None:
            elapsed = time.perf_counter() - started
            self._step_seconds += elapsed
            self.budget.charge(elapsed)

    def _read_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs every step, so it is kept lean: on a small model each attribute walk or scalar tensor op here is a
        # measurable part of the step (see benchmarks/grad_spikes.py).
        step = self._step(trainer)
        record = self._open
        if record is None or record.step != step:
            record = self._open = _Step(step, logged=self._is_logged_step(trainer, step))
            samples = self._samples[1] if self._samples[0] == step else 0
            if samples:
                self._usual_samples = max(self._usual_samples, samples)
                record.weight = samples / self._usual_samples
            # budget mode skips the gradients of most steps (never during the warm-up, never a logged step)
            if (
                self.stride > 1
                and step % self.stride
                and not record.logged
                and int(self.grad_detector._count) >= self.warmup_steps
            ):
                self._current = (step, None)
                return
            self._current = (step, record)
        elif self._current is not None and self._current[1] is None:
            return  # (a second optimizer at a skipped step)
        index = self._stream_index(trainer)
        if any(read.stream == index for read in record.reads):
            return  # the same optimizer stepped twice within one step: the first reading defines the step
        stream = self._streams[index]
        names, params = self._parameters(stream, pl_module)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # (not `None in grads`: that compares tensors with ==, ~8 us each)
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                return
            names, grads, params = (
                [names[i] for i in present],
                [grads[i] for i in present],
                [params[i] for i in present],
            )
        if names is not stream.resolved and names != stream.resolved:
            self._resolve_groups(stream, names, grads[0])
        per_tensor = torch._foreach_norm(grads, 2, **stream.norm_dtype)  # one fused pass
        # logged steps only (sharded strategies: not yet, see the class docstring): stays on the device
        nlm = _nlm_terms(grads, params, stream.norm_dtype) if record.logged and not self._sharded else None
        if (self._host and not self._defer) or self.clip:
            # read now and scored now (before the update). CPU: plain floats (each scalar tensor op costs ~5 us, more
            # than this arithmetic; reading the norms one by one is cheaper than stacking them first, measured in a
            # real loop, up to ~12). clip=True decides before the optimizer step, so it reads them now everywhere
            if self._sharded:  # each rank holds a shard of every gradient: the squares of the shards add up
                squares = distributed.all_reduce_sum(torch.stack(per_tensor).double() ** 2).tolist()
            elif len(per_tensor) <= 12 and self._host:
                squares = [float(v) ** 2 for v in per_tensor]
            else:
                squares = [v * v for v in torch.stack(per_tensor).double().tolist()]
            read = _Read(index, squares, nlm=None if nlm is None else tuple(nlm.tolist()))
            record.reads.append(read)
            clip_to = self._score_read(trainer, record, read)
            if clip_to is not None:
                total = math.sqrt(sum(squares))
                torch._foreach_mul_(grads, clip_to / max(total, 1e-30))
        else:  # accelerators: the squares stay on the device until the next readback (no sync)
            squares_t = torch.stack(per_tensor).double() ** 2
            if self._sharded:
                squares_t = distributed.all_reduce_sum(squares_t)
            record.reads.append(_Read(index, squares_t, nlm=nlm))
        # gradients are identical on every rank after DDP's all-reduce, so every rank decides the same
        if self.track_update and record.logged and self._snapshot is None:
            trainable = [p for p in self._module_parameters(pl_module) if p.grad is not None]
            self._snapshot = (trainable, [p.detach().clone() for p in trainable])

    def _stream_index(self, trainer: pl.Trainer) -> int:
        optimizers = self._optimizers
        if self._optimizer is not None and not any(o is self._optimizer for o in optimizers):
            optimizers = self._optimizers = list(trainer.optimizers)  # set up after on_train_start
        if len(optimizers) <= 1:
            return 0
        optimizer = self._optimizer
        index = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        while len(self._streams) <= index:
            self._streams.append(self._new_stream())
        return index

    def _module_parameters(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _parameters(self, stream: _Stream, pl_module: pl.LightningModule) -> tuple[list[str], list[torch.nn.Parameter]]:
        """Names and trainable parameters of the optimizer being stepped, cached per fit (walking
        ``named_parameters()`` costs ~0.1 ms a step on a small model); rebuilt when the optimizer gains parameters
        (``add_param_group`` when a backbone is unfrozen). Parameters frozen later have no gradient and drop out."""
        optimizer = self._optimizer
        count = sum(len(g["params"]) for g in optimizer.param_groups) if optimizer is not None else -1
        if stream.params is None or stream.params[0] != count:
            if self._names is None:
                self._names = {id(p): n.replace(_COMPILED, "") for n, p in pl_module.named_parameters()}
            if optimizer is None:
                chosen = self._module_parameters(pl_module)
            else:
                seen: set[int] = set()
                chosen = []
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if id(p) not in seen and p.requires_grad and id(p) in self._names:
                            seen.add(id(p))
                            chosen.append(p)
            stream.params = (count, [self._names[id(p)] for p in chosen], chosen)
        return stream.params[1], stream.params[2]

    def _resolve_groups(self, stream: _Stream, names: list[str], gradient: Tensor) -> None:
        """Layer groups of the parameters that have gradients (again whenever that set changes), whether they live
        on the CPU, and the norm's accumulation dtype."""
        stream.resolved = names
        self._host = gradient.device.type == "cpu"
        # one fused pass, accumulated in float32 even for bf16/fp16 gradients (float64 stays float64)
        wide = gradient.dtype in (torch.float32, torch.float64)
        stream.norm_dtype = {} if wide else {"dtype": torch.float32}
        if self.groups is False:
            blocks: dict[str, list[str]] = {}
        elif self.groups is None:
            blocks = top_level_blocks(names)
        else:
            blocks = {g: [n for n in names if re.search(pattern, n)] for g, pattern in self.groups.items()}
        stream.group_names = list(blocks)
        position = {n: i for i, n in enumerate(names)}
        stream.group_members = [[position[n] for n in members] for members in blocks.values()]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.budget is None:
            self._finish_step(trainer, pl_module, outputs)
            return
        started = time.perf_counter()
        kind = self._finish_step(trainer, pl_module, outputs)
        elapsed = time.perf_counter() - started
        self.budget.charge(elapsed)
        self._step_seconds += elapsed
        if kind is not None:  # a whole optimizer step: what it cost, for the stride decision
            tally = self._step_costs[kind]
            tally[0] += self._step_seconds - self._drain_seconds
            tally[1] += 1
            # scoring the skipped steps' losses is their cost, although it ran in this step
            self._step_costs[_SKIPPED][0] += self._drain_seconds
            self._step_seconds = self._drain_seconds = 0.0

    def _finish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> int | None:
        """Attach the loss to the step and score what is due. Returns ``None`` while accumulating, else what kind of
        step it was (``_SKIPPED``, ``_READ`` or ``_LOGGED``), for budget mode's cost tallies."""
        loss = self._extract_loss(outputs) if self.watch_loss else None
        record = self._open
        if record is None:
            if pl_module.automatic_optimization:
                if loss is not None:  # accumulating: Lightning divides the loss by accumulate_grad_batches
                    self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
                return None
            # manual optimization without an optimizer step in this batch: the loss alone
            step = self._step(trainer)
            record = _Step(step, logged=self._is_logged_step(trainer, step))
            self._current = (step, None)
        self._open = None
        if loss is not None:
            record.loss = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_sum = None
        read = self._current is not None and self._current[1] is not None
        self._current = None
        if self._snapshot is not None:
            record.update = self._update_size()
            self._snapshot = None
        self._waiting.append(record)
        if record.logged or (read and self._host and not self._defer):
            self._flush(trainer)
        if self.budget is not None and record.logged:
            self._decide_stride(trainer, record.step)
        return _LOGGED if record.logged else (_READ if read else _SKIPPED)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    # ------------------------------------------------------------------------------------------------ scoring
    def _flush(self, trainer: pl.Trainer) -> None:
        """Score every pending step in order: one readback of the device values, one all-reduce of the losses.
        Collective under DDP (every rank flushes at the same steps)."""
        pending, self._waiting = self._waiting, []
        if not pending:
            self.decide_stop(trainer, self._fired)
            self._fired = False
            return
        device = [r for s in pending for r in s.reads if r.scored is None]
        if device:  # accelerators: one transfer for every norm (and nlm term) since the last readback
            parts = [t.reshape(-1) for r in device for t in (r.squares, r.nlm) if t is not None]
            values = torch.cat(parts).cpu().tolist()
            offset = 0
            for r in device:
                n = r.squares.numel()
                r.squares, offset = values[offset : offset + n], offset + n
                if r.nlm is not None:
                    r.nlm, offset = (values[offset], values[offset + 1]), offset + 2
        losses = [s for s in pending if s.loss is not None]
        if losses:
            # host scalars: float() is the cheapest read; accelerators: one stack and one transfer
            if all(isinstance(s.loss, float) or s.loss.device.type == "cpu" for s in losses) and self._world_size == 1:
                values = [float(s.loss) for s in losses]
            else:
                where = next((s.loss.device for s in losses if isinstance(s.loss, Tensor)), torch.device("cpu"))
                stacked = torch.stack(
                    [torch.as_tensor(s.loss, dtype=torch.float64, device=where).reshape(()) for s in losses]
                )
                if self._world_size > 1:
                    stacked = distributed.all_reduce_mean(stacked)
                values = stacked.cpu().tolist()
            for s, value in zip(losses, values, strict=True):
                s.loss = value
        for s in pending:
            skipped = not s.reads and not s.logged
            t0 = time.perf_counter() if skipped else 0.0
            for r in s.reads:
                if r.scored is None:
                    self._score_read(trainer, s, r)
            self._score_step(trainer, s)
            if skipped:
                self._drain_seconds += time.perf_counter() - t0
        self.decide_stop(trainer, self._fired)
        self._fired = False

    def _score_read(self, trainer: pl.Trainer, record: _Step, read: _Read) -> float | None:
        """Score one optimizer's gradient norm (alerts about it are emitted here: on the CPU, and with ``clip=True``
        everywhere, before the update). Returns the norm to clip to, or ``None``."""
        stream = self._streams[read.stream]
        squares = read.squares
        total = math.sqrt(sum(squares))
        short = record.weight < self.min_batch_fraction
        detector = stream.detector
        clip_to = None
        scaler = self._scaler
        overflow = scaler is not None and not math.isfinite(total)
        if short or overflow:
            z, spike, bad = 0.0, False, not math.isfinite(total)
        else:
            level = float(detector.clip_value()) if self.clip else math.nan
            z, spike, bad = detector.update_float(total)
            if self.clip and spike:
                clip_to = level
        growing = stream.growth is not None and not short and not overflow and stream.growth.update(z)
        diverging = stream.divergence is not None and not overflow and stream.divergence.update(total, record.weight)
        self.clip_count += int(clip_to is not None)
        read.scored = {"total": total, "z": z, "spike": spike, "overflow": overflow}
        p = self._key_prefix(read.stream)
        source = type(self).__name__
        step = record.step
        if overflow:
            self.overflow_count += 1
            stream.overflow_run += 1
            # routine: the scaler skips the step and lowers its scale; a long run of skips or a scale below 1 (the
            # gradients overflow unscaled) is not
            collapsed = stream.overflow_run >= self.max_overflow_steps or _scale(scaler) < 1.0
            if collapsed and not stream.bad:
                stream.bad = True
                self._alert(
                    trainer,
                    Alert(
                        step,
                        "non_finite",
                        source,
                        f"{p}/norm",
                        total,
                        float(self.max_overflow_steps),
                        f"the gradient scaler skipped {stream.overflow_run} consecutive steps (scale now "
                        f"{_scale(scaler):.3g}): the gradients are non-finite even as the scale collapses; training "
                        "has diverged (alerted once until a step is not skipped).",
                    ),
                )
        else:
            if stream.overflow_run:
                stream.overflow_run, stream.bad = 0, False
            if bad and not stream.bad:
                self._alert(
                    trainer,
                    Alert(
                        step,
                        "non_finite",
                        source,
                        f"{p}/norm",
                        total,
                        math.inf,
                        f"the gradient norm is {total} at step {step}: training has diverged or a batch is corrupt "
                        "(alerted once until the norm is finite again).",
                    ),
                )
            stream.bad = bad
        if spike:
            self._alert(
                trainer,
                Alert(
                    step,
                    "grad_spike",
                    source,
                    f"{p}/zscore",
                    z,
                    self.z_threshold,
                    f"gradient norm {total:.4g} is {z:.1f} standard deviations (log scale) above its running mean"
                    f"{' and was clipped' if clip_to is not None else ''}.",
                ),
            )
        if growing:
            self._alert(
                trainer,
                Alert(
                    step,
                    "grad_growth",
                    source,
                    f"{p}/zscore",
                    z,
                    self.growth_z,
                    f"the gradient norm ({total:.4g}) has stayed more than {self.growth_z:g} standard "
                    f"deviations (log scale) above its running mean for {self.growth_patience} steps: a sustained "
                    "rise, not a one-step spike (for example a learning rate past the edge of stability).",
                ),
            )
        if diverging:
            self._divergence_alert(trainer, step, f"{p}/rise", "gradient norm", stream.divergence)
        read.scored["event"] = spike or bad
        return clip_to

    def _score_step(self, trainer: pl.Trainer, record: _Step) -> None:
        """Score the step's loss, then log and alert (its gradients are scored already)."""
        step, p, source = record.step, self.prefix, type(self).__name__
        loss = math.nan if record.loss is None else float(record.loss)
        loss_z, loss_spike, loss_bad = 0.0, False, False
        if record.loss is not None:
            if record.weight < self.min_batch_fraction:
                loss_bad = not math.isfinite(loss)
            else:
                loss_z, loss_spike, loss_bad = self.loss_detector.update_float(loss)
            if self.loss_divergence is not None and self.loss_divergence.update(loss, record.weight):
                self._divergence_alert(trainer, step, f"{p}/loss/rise", "loss", self.loss_divergence)
        events = any(r.scored is not None and r.scored["event"] for r in record.reads) or loss_spike or loss_bad
        metrics: dict[str, float] = {}
        if record.logged or events:
            for read in record.reads:
                scored = read.scored
                if scored.get("overflow"):
                    # a GradScaler overflow: the scaler skipped this update, and its unscaled norm is inf/NaN by
                    # definition; `grad/overflow_steps` counts these steps instead of logging the non-finite norm
                    continue
                key = self._key_prefix(read.stream)
                stream = self._streams[read.stream]
                metrics[f"{key}/norm"] = scored["total"]
                metrics[f"{key}/zscore"] = scored["z"]
                metrics[f"{key}/spike"] = float(scored["spike"])
                squares = read.squares
                for g, members in zip(stream.group_names, stream.group_members, strict=True):
                    metrics[f"{key}/norm/{g}"] = math.sqrt(sum(squares[i] for i in members))
                if read.nlm is not None:
                    metrics[f"{key}/nlm_alignment"] = _alignment(read.nlm, scored["total"])
                if record.logged and stream.divergence is not None and stream.divergence.updates:
                    metrics[f"{key}/level"] = math.exp(stream.divergence.level)
                    if math.isfinite(stream.divergence.rise):
                        metrics[f"{key}/rise"] = stream.divergence.rise
            if self.watch_loss and record.loss is not None:  # (a manual training_step may return nothing)
                metrics[f"{p}/loss/value"] = loss
                metrics[f"{p}/loss/zscore"] = loss_z
                metrics[f"{p}/loss/spike"] = float(loss_spike)
                divergence = self.loss_divergence
                if record.logged and divergence is not None and divergence.updates:
                    metrics[f"{p}/loss/level"] = math.exp(divergence.level)
                    if math.isfinite(divergence.rise):
                        metrics[f"{p}/loss/rise"] = divergence.rise
            if record.update is not None:
                update, size = (float(v) for v in record.update)
                metrics[f"{p}/update/norm"] = update
                metrics[f"{p}/update/ratio"] = update / max(size, 1e-30)
            if self.clip:
                metrics[f"{p}/grad/clipped"] = float(self.clip_count)
            if self.overflow_count:
                metrics[f"{p}/grad/overflow_steps"] = float(self.overflow_count)
            if self.budget is not None:
                metrics[f"{p}/grad/stride"] = float(self.stride)
        for read in record.reads:
            if read.scored["spike"]:
                suffix = "" if read.stream == 0 else f"/optimizer_{read.stream}"
                metrics[f"{p}/events/grad_spike{suffix}"] = read.scored["z"]
        if loss_spike:
            metrics[f"{p}/events/loss_spike"] = loss_z
        if metrics:
            self.last_metrics = metrics
            self.log_metrics(trainer, metrics, step)
        if loss_bad and not self._loss_bad:
            self._alert(
                trainer,
                Alert(
                    step,
                    "non_finite",
                    source,
                    f"{p}/loss/value",
                    loss,
                    math.inf,
                    f"the loss is {loss} at step {step}: training has diverged or a batch is corrupt (alerted once "
                    "until the loss is finite again).",
                ),
            )
        if record.loss is not None:
            self._loss_bad = loss_bad
        if loss_spike:
            self._alert(
                trainer,
                Alert(
                    step,
                    "loss_spike",
                    source,
                    f"{p}/loss/zscore",
                    loss_z,
                    self.z_threshold,
                    f"loss {loss:.4g} is {loss_z:.1f} standard deviations (log scale) above its running mean.",
                ),
            )

    def _divergence_alert(self, trainer: pl.Trainer, step: int, metric: str, what: str, rule: DivergenceRule) -> None:
        self._alert(
            trainer,
            Alert(
                step,
                "divergence",
                type(self).__name__,
                metric,
                rule.rise,
                rule.ratio,
                f"the {what}'s slow level ({math.exp(rule.level):.4g}, ~{rule.time_constant:g}-step average) is "
                f"{rule.rise:.2f}x its lowest level of the last {rule.horizon} steps ({math.exp(rule.best):.4g}): "
                "a sustained rise, the run is diverging (for example a learning rate too high).",
            ),
        )

    def _alert(self, trainer: pl.Trainer, alert: Alert) -> None:
        self._fired = True
        self.emit_alert(trainer, alert)

    def _key_prefix(self, stream: int) -> str:
        return f"{self.prefix}/grad" if stream == 0 else f"{self.prefix}/grad/optimizer_{stream}"

    def _update_size(self) -> tuple[Tensor, Tensor]:
        """Norm of the update the optimizer just applied (against the snapshot) and of the parameters."""
        params, before = self._snapshot
        params = [p.detach() for p in params]
        delta = torch._foreach_sub(params, before)
        # float32 accumulation for bf16/fp16; float64 parameters keep float64 (a float32 dtype would be a narrowing)
        wide = {} if params[0].dtype in (torch.float32, torch.float64) else {"dtype": torch.float32}
        update = torch.stack(torch._foreach_norm(delta, 2, **wide)).double().norm()
        size = torch.stack(torch._foreach_norm(params, 2, **wide)).double().norm()
        return update, size

    def _decide_stride(self, trainer: pl.Trainer, step: int) -> None:
        """Budget mode: the smallest stride at which reading the gradients keeps within ``budget_share`` of the
        budget, from the mean cost of a step that reads them (``r``) and of one that does not (``s``): at stride
        ``k`` a step costs ``r / k + s (1 - 1 / k)`` on average. Logged steps are left out: their extra cost (the
        logger's writes, the update norm) comes every ``log_every_n_steps`` whatever the stride, so striding could
        not pay for it (it is charged to the shared ledger like everything else). Collective under DDP (rank 0's
        clock decides).
        """
        per_step = self.budget.seconds_per_step(step)
        stride = self.stride
        (skip_s, skipped), (read_s, read) = self._step_costs[_SKIPPED], self._step_costs[_READ]
        if per_step is not None and read and not self.clip:
            every = self._every_n(trainer)
            read_cost = read_s / read
            skip_cost = skip_s / skipped if skipped else 0.0
            allowed = self.budget_share * self.budget.max_overhead * per_step
            if read_cost <= allowed:
                stride = 1
            elif skip_cost >= allowed:
                stride = every
            else:
                stride = min(every, math.ceil((read_cost - skip_cost) / (allowed - skip_cost)))
        if self._world_size > 1:
            stride = trainer.strategy.broadcast(stride, src=0)
        if stride > 1 and self.stride == 1:
            read = self._step_costs[_READ][0] / max(1, self._step_costs[_READ][1])
            self._warn_once(
                "grad-stride",
                f"GradientSpikeMonitor: reading the gradient norms takes {read * 1e3:.2f} ms a step against "
                f"{(per_step or math.nan) * 1e3:.2f} ms steps, more than its share ({self.budget_share:.0%}) of the "
                f"max_overhead={self.budget.max_overhead:g} budget; it now reads them every {stride} steps (and at "
                "every logged step), and still scores the loss every step. Pass max_overhead=None (LandscapeMonitor: "
                "grad_spikes={'max_overhead': None}) to read every step.",
            )
        self.stride = int(stride)

    @staticmethod
    def _extract_loss(outputs: Any) -> Tensor | None:
        if type(outputs) is dict or isinstance(outputs, Mapping):  # (the exact-type test skips the ABC machinery)
            outputs = outputs.get("loss")
        return outputs.detach() if isinstance(outputs, Tensor) and outputs.numel() == 1 else None


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (depth first); 0 when it holds none."""
    while True:
        if isinstance(batch, Tensor):
            return int(batch.shape[0]) if batch.dim() else 1
        if type(batch) in (tuple, list) or isinstance(batch, tuple | list):
            if not batch:
                return 0
            batch = batch[0]
        elif isinstance(batch, Mapping):
            if not batch:
                return 0
            batch = next(iter(batch.values()))
        else:
            return 0


def _nlm_terms(grads: list[Tensor], params: list[torch.nn.Parameter], norm_dtype: dict[str, torch.dtype]) -> Tensor:
    """``(<g, theta>, ||theta||^2)`` over the given tensors, in float64, on their device (no host sync): one dot
    per tensor (no gradient-sized temporary; low-precision tensors are widened one at a time) and one fused norm
    pass over the parameters."""
    theta = [p.detach() for p in params]
    if norm_dtype:  # bf16/fp16: accumulate in float32, as the norm does
        dots = [torch.dot(g.reshape(-1).float(), t.reshape(-1).float()) for g, t in zip(grads, theta, strict=True)]
    else:
        dots = [torch.dot(g.reshape(-1), t.reshape(-1)) for g, t in zip(grads, theta, strict=True)]
    sizes = torch._foreach_norm(theta, 2, **norm_dtype)
    return torch.stack([torch.stack(dots).double().sum(), (torch.stack(sizes).double() ** 2).sum()])


def _alignment(nlm: tuple[float, float], grad_norm: float) -> float:
    """``cos(-g, theta) = -<g, theta> / (||g|| ||theta||)``; 0 when either is zero (no direction), NaN when the
    gradient is not finite."""
    dot, theta_sq = nlm
    scale = grad_norm * math.sqrt(theta_sq)
    if not math.isfinite(scale) or not math.isfinite(dot):
        return math.nan
    return -dot / scale if scale > 0 else 0.0


def _scaler(trainer: pl.Trainer) -> Any:
    """The active GradScaler of ``precision="16-mixed"``, or ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _scale(scaler: Any) -> float:
    try:
        return float(scaler.get_scale())
    except (RuntimeError, AttributeError):
        return math.nan
