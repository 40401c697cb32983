"""GradientSpikeMonitor: gradient-norm, loss and update-size spikes and divergence, every optimizer step.

The callback glue: arguments, Lightning hooks, the step's record from the first gradient read to the flush, and the
budget clock. Its parts: ``_grad_read`` (which gradients, the values read from them, the readback),
``_grad_records`` (records, per-optimizer streams, stride tallies, checkpoint state), ``_grad_alerts`` (scoring,
metrics, alerts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_landscape.callbacks._base import LandscapeCallback, is_sharded
from lightning_landscape.callbacks._grad_alerts import _GradAlerts
from lightning_landscape.callbacks._grad_read import (
    _COMPILED,
    _batch_size,
    _GradReading,
    _readback,
    _reduce_losses,
    _scaler,
)
from lightning_landscape.callbacks._grad_records import _LOGGED, _READ, _SKIPPED, _GradState, _Step
from lightning_landscape.callbacks._schedule import is_logging_step
from lightning_landscape.core import distributed  # noqa: F401  (tests patch `grad_spikes.distributed`)
from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int, check_optional_float
from lightning_landscape.core.spikes import SPIKE_UPDATES

#: Base-class arguments that do not apply to this monitor, with the base's defaults (accepted only at these).
_NOT_APPLICABLE = {"loss_fn": None, "num_probe_batches": 4, "mode": "eval"}


class GradientSpikeMonitor(_GradAlerts, _GradReading, _GradState, LandscapeCallback):
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
        - ``p/grad/norm``, ``p/grad/zscore``, ``p/grad/spike`` (1 where ``grad_spike`` alerts, else 0),
          ``p/grad/norm/{group}`` per layer group (``torch.compile``'s ``_orig_mod.`` removed from the names).
        - ``p/grad/nlm_alignment``: ``cos(-g, theta) = -<g, theta> / (||g|| ||theta||)`` over the parameters and the
          gradients of ``p/grad/norm`` (after unscaling, before any clipping; clipping multiplies by a scalar and
          leaves it unchanged), at the logged steps only. For a positively homogeneous network (ReLU layers
          without biases or normalisation gains) ``theta`` itself is the naive-loss-minimisation direction, which
          only scales the logits: a value near 1 means the step mostly grows the weights along themselves, the
          precursor of softmax collapse (Prieto et al.); near 0 the update turns the weights; negative, it
          shrinks them (weight decay winning). 0 when the gradient or the parameters are zero, NaN when the
          gradient is not finite, absent at GradScaler overflow steps. Under sharded strategies (FSDP, DeepSpeed)
          the shards' dot products and parameter squares are summed in the same collective as the gradient
          squares (n + 2 values on a logged step instead of n).
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
        - ``grad_spike``: z above ``z_threshold``, and either the norm is at least ``min_spike_ratio`` (10) times its
          running level (``exp`` of the EMA mean of its log) or the previous read spiked too (a level shift, a burst).
          Why: per-example gradients are heavy-tailed, and at small batch sizes one hard example in a batch makes a
          healthy step's norm several times its neighbours'. In a healthy 800-step run of the compat suite's nanoGPT
          (batch 8, 256 windows) each of the three z above 5 (6.0, 6.5, 9.6 at steps 239, 314, 529; norms 2.6-3.1x
          their level, back to normal at the next step) was a batch holding a window whose own gradient norm was
          5.8-8.6x the median window's (long runs of indentation). Such isolated healthy spikes reached z 9.6 and
          3.7x over six nanoGPT seeds, batch 16 and HF GPT-2, and 4.7x (z 5.3) on Lightning's demo transformer under
          SGD; the smallest spike of an instability in ``benchmarks/early_warning.py`` was 23x (gd-past-eos, at its
          divergence), corrupted batches 10^4x. The gate sits between, an order of magnitude.
        - ``loss_spike``: z above ``z_threshold``.
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

    Budget mode (``max_overhead``; ``LandscapeMonitor`` gives this monitor 10% of its budget): the hooks' time is
    charged every step, and at every logged step the monitor checks that reading the gradients every step fits its
    share of the budget. When it does not, it reads them every ``stride``-th step (and at every logged step, and at
    every step until the detector's warm-up is done, so spike detection starts after ``warmup_steps`` steps whatever
    the stride), warns once and logs ``p/grad/stride``. The loss is still scored at every step (a skipped step's loss
    with the next reading step, in one batch; its alerts name its own step). ``clip=True`` always reads every step.

    Args:
        z_threshold: z above which a value is a spike (ZClip clips at 2.5; alerts need more, see core/spikes.py).
        min_spike_ratio: an isolated gradient spike (the read before it did not spike) alerts only when the norm is at
            least this many times its running level; ``None``: every spike alerts. ``clip=True`` clips every spike
            regardless (clipping a healthy hard batch is harmless, and is what ZClip does).
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
        min_spike_ratio: float | None = 10.0,
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
        self.min_spike_ratio = check_optional_float("min_spike_ratio", min_spike_ratio, minimum=1.0)
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
        self.growth_z = check_optional_float("growth_z", growth_z, minimum=0.0, strict_minimum=True)
        self.growth_patience = check_int("growth_patience", growth_patience, minimum=1)
        self.divergence_ratio = check_optional_float(
            "divergence_ratio", divergence_ratio, minimum=1.0, strict_minimum=True
        )
        self.grad_divergence_ratio = check_optional_float(
            "grad_divergence_ratio", grad_divergence_ratio, minimum=1.0, strict_minimum=True
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
        # (runs every step: the budget is read once, and timed only where no section of LandscapeMonitor charges)
        budget = self.schedule.budget
        started = time.perf_counter() if budget is not None and not budget.in_section else None
        step = self._step(trainer)
        samples = _batch_size(batch)
        self._samples = (step, samples + (self._samples[1] if self._samples[0] == step else 0))
        if budget is not None:
            budget.start(step)
            if started is not None:
                budget.charge(time.perf_counter() - started)

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
        return is_logging_step(step, self._every_n(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        budget = self.schedule.budget
        started = time.perf_counter() if budget is not None else 0.0
        self._optimizer = optimizer
        self._read_gradients(trainer, pl_module)
        if budget is not None:
            elapsed = time.perf_counter() - started
            self._step_seconds += elapsed
            budget.charge(elapsed)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        budget = self.schedule.budget
        if budget is None:
            self._finish_step(trainer, pl_module, outputs)
            return
        started = time.perf_counter()
        kind = self._finish_step(trainer, pl_module, outputs)
        elapsed = time.perf_counter() - started
        budget.charge(elapsed)
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
        _readback([r for s in pending for r in s.reads if r.scored is None])
        _reduce_losses(pending, self._world_size)
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

    @staticmethod
    def _extract_loss(outputs: Any) -> Tensor | None:
        if type(outputs) is dict or isinstance(outputs, Mapping):  # (the exact-type test skips the ABC machinery)
            outputs = outputs.get("loss")
        if not isinstance(outputs, Tensor) or outputs.numel() != 1:
            return None
        # Lightning hands over a detached copy already (automatic optimization); detach only what is not
        return outputs.detach() if outputs.requires_grad else outputs
