"""GradientSpikeMonitor: gradient-norm, loss and update-size spikes, every optimizer step, without host syncs."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_landscape.callbacks._base import LandscapeCallback, is_sharded
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_float, check_int
from lightning_landscape.core.alerts import Alert, ConsecutiveAboveRule
from lightning_landscape.core.params import top_level_blocks
from lightning_landscape.core.spikes import EMAZScore

# Columns of one step's record (a float64 tensor on the training device until it is read back).
_GRAD_NORM, _GRAD_Z, _GRAD_SPIKE, _GRAD_BAD, _CLIPPED, _LOSS, _LOSS_Z, _LOSS_SPIKE, _LOSS_BAD, _UPDATE, _PARAM = range(
    11
)
_WIDTH = 11
# Kinds of optimizer step, for budget mode's cost tallies.
_SKIPPED, _READ, _LOGGED = range(3)


class GradientSpikeMonitor(LandscapeCallback):
    """Global and per-layer gradient norms, the training loss and the size of the applied update, with spike alerts.

    Every optimizer step the global gradient norm is read in ``on_before_optimizer_step`` (after AMP unscaling and
    DDP's all-reduce, before Lightning's gradient clipping) and scored by an EMA z-score on the log scale
    (:class:`~lightning_landscape.core.spikes.EMAZScore`; ZClip's statistic, tuned for alerting). The loss of the
    step (averaged over ranks) is scored the same way. Everything stays on the training device; the host reads the
    records back every ``every_n_steps`` steps (on CPU: every step), which is when values are logged and alerts are
    decided, so on an accelerator an alert can come up to ``every_n_steps - 1`` steps after the step it names.

    Logged metrics (``p`` = ``prefix``; dense keys at every ``every_n_steps``-th step and at every event):
        - ``p/grad/norm``, ``p/grad/zscore``, ``p/grad/spike`` (0/1), ``p/grad/norm/{group}`` per layer group.
        - ``p/loss/value``, ``p/loss/zscore``, ``p/loss/spike`` (0/1), when ``watch_loss``.
        - ``p/update/norm`` (norm of the parameter change the optimizer applied) and ``p/update/ratio`` (over the
          parameter norm), when ``track_update`` (measured at the logged steps only).
        - ``p/grad/clipped``: how many steps ``clip=True`` acted on so far.
        - ``p/events/grad_spike``, ``p/events/loss_spike``: the z-score, logged only at spike steps (a sparse tag
          TensorBoard's sampling cannot drop).
        - ``p/grad/stride``: budget mode only, every how many steps the gradients are read (see below).

    Alerts: ``grad_spike``, ``loss_spike``, ``non_finite`` (NaN/inf gradient norm or loss, at once on CPU unless
    budget mode strides, see below), and
    ``grad_growth``: the gradient z-score stayed above ``growth_z`` for ``growth_patience`` consecutive steps.
    That is a sustained rise rather than a one-step spike, the signature of a run drifting past the edge of
    stability: in ``benchmarks/early_warning.py`` it fired 100+ steps before a full-batch run diverged, where the
    spike rule fires at the blow-up; on 50,000 stationary steps (10-50% noise) it never fired.

    Cost per step: one fused norm pass over the gradients in float32 (``torch._foreach_norm``) and a few scalar
    operations; no host sync between readbacks. ``track_update`` copies the parameters once per logged step. On CPU
    that is ~0.05-0.15 ms a step, which on a tiny model with 3 ms steps is itself a few percent.

    Budget mode (``max_overhead``; ``LandscapeMonitor`` gives this monitor 60% of its budget): the hooks' time is
    charged every step, and at every logged step the monitor checks that reading the gradients every step fits its
    share of the budget. When it does not, it reads them every ``stride``-th step (and at every logged step; the
    smallest stride that fits, from the measured cost of a reading step and of a loss-only step; logged steps, whose
    writes cost the same at any stride, are charged but left out), warns once and logs ``p/grad/stride``. The loss
    is still scored at every step (a skipped step's loss with the next reading step, in one batch; its alerts name
    its own step), so a corrupted batch is still caught; a gradient spike on a step that was not read is not, and
    the ``grad_growth`` rule counts reading steps. ``clip=True`` always reads every step. On the reference
    workloads only the 85k-parameter MLP (3-5 ms steps) needed a stride (2).

    Args:
        z_threshold: z above which a value is a spike (ZClip clips at 2.5; alerts need more, see core/spikes.py).
        warmup_steps: steps that initialise the statistics; nothing is flagged before.
        clip: clip a spiking gradient back to the norm at ``z = z_threshold`` before the optimizer step (ZClip-style
            mitigation, off by default). Steps without a spike are untouched bitwise.
        alpha: EMA decay.
        groups: ``None`` for the top-level blocks of the model (looking through a wrapper such as ``self.net``),
            ``False`` for none, or ``{name: regex}`` matched against parameter names.
        watch_loss: also score the training loss.
        loss_log_scale: score ``log(loss)``; set False for a loss that can be zero or negative.
        track_update: also log the size of the applied update.
        growth_z, growth_patience: the ``grad_growth`` rule (``growth_z=None`` turns it off).
        every_n_steps: readback and logging cadence; ``None`` uses the Trainer's ``log_every_n_steps``.
        **kwargs: ``on_alert``, ``prefix``, ``strict``, ``alert_cooldown_steps`` of
            :class:`~lightning_landscape.callbacks._base.LandscapeCallback`. (``loss_fn``, ``num_probe_batches``
            and ``mode`` do not apply: this monitor reads the training step's own gradients and loss.)

    References: Kumar et al. 2025 (ZClip, arXiv 2504.02507); Wortsman et al. 2023 ("Small-scale proxies for
    large-scale Transformer training instabilities").
    """

    group = "grad"

    def __init__(
        self,
        z_threshold: float = 5.0,
        warmup_steps: int = 50,
        clip: bool = False,
        *,
        alpha: float = 0.97,
        groups: Mapping[str, str] | bool | None = None,
        watch_loss: bool = True,
        loss_log_scale: bool = True,
        track_update: bool = True,
        growth_z: float | None = 2.5,
        growth_patience: int = 3,
        every_n_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("loss_fn", "num_probe_batches", "mode"):
            if name in kwargs:
                raise TypeError(
                    f"GradientSpikeMonitor does not take `{name}`: it reads the training step's own gradients and loss."
                )
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, minimum=1)
        super().__init__(every_n_steps=every_n_steps or 1, **kwargs)
        self._every = every_n_steps
        self.z_threshold = check_float("z_threshold", z_threshold, minimum=0.0, strict_minimum=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.clip = check_bool("clip", clip)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, strict_minimum=True)
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
        self.track_update = check_bool("track_update", track_update)
        self.grad_detector = EMAZScore(alpha=alpha, z_threshold=z_threshold, warmup_steps=warmup_steps)
        self.loss_detector = EMAZScore(
            alpha=alpha,
            z_threshold=z_threshold,
            warmup_steps=warmup_steps,
            log_scale=check_bool("loss_log_scale", loss_log_scale),
        )
        self.growth_z = (
            None if growth_z is None else check_float("growth_z", growth_z, minimum=0.0, strict_minimum=True)
        )
        self.growth_patience = check_int("growth_patience", growth_patience, minimum=1)
        self.growth_rule = (
            ConsecutiveAboveRule(self.growth_z, self.growth_patience) if self.growth_z is not None else None
        )
        self.clip_count = 0
        self._group_index: Tensor | None = None
        self._group_names: list[str] = []
        self._group_members: list[list[int]] = []  # parameter positions of each group (host path)
        self._records: list[tuple[int, list[float] | Tensor, list[float] | Tensor]] = []
        self._current: tuple[int, Tensor, Tensor] | None = None
        self._loss_sum: Tensor | None = None
        self._snapshot: list[Tensor] | None = None
        self._parameters: tuple[list[str], list[torch.nn.Parameter]] | None = None
        self._resolved_names: list[str] | None = None  # the parameter names `_group_index` was built for
        self._norm_dtype: dict[str, torch.dtype] = {}
        self._sharded = False
        self._world_size = 1
        self._deferred_losses: list[tuple[int, Tensor | None]] = []
        self._reset_stride()

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
            # losses of steps budget mode skipped, not scored yet (a checkpoint can fall between reading steps)
            "deferred_losses": [(step, None if loss is None else float(loss)) for step, loss in self._deferred_losses],
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        if "grad_detector" in state:
            self.grad_detector.load_state_dict(state["grad_detector"])
            self.loss_detector.load_state_dict(state["loss_detector"])
        self.clip_count = int(state.get("clip_count", 0))
        if self.growth_rule is not None and state.get("growth_rule") is not None:
            self.growth_rule.load_state_dict(state["growth_rule"])
        self._deferred_losses = [(int(step), loss) for step, loss in state.get("deferred_losses", [])]

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """No probe set: this monitor reads the training step itself (its hooks' time is charged to the budget)."""
        if self.budget is not None:
            self.budget.start(trainer.global_step)
        self.idle_until = sys.maxsize  # nothing more to do here until the next fit (on_train_start resets it)

    def _every_n(self, trainer: pl.Trainer) -> int:
        return self._every or max(1, trainer.log_every_n_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._parameters = None
        self._resolved_names = None  # the model may sit on another device than in the previous fit
        self._sharded = is_sharded(trainer.strategy)
        self._world_size = trainer.world_size
        # a step left half-done by an earlier fit that failed is not this fit's; deferred losses from before this
        # fit's first step came from the checkpoint it resumes (kept), later ones from an earlier fit (dropped)
        self._current, self._loss_sum, self._snapshot = None, None, None
        self._deferred_losses = [(s, loss) for s, loss in self._deferred_losses if s < trainer.global_step]
        self._reset_stride()  # budget mode decides the stride afresh in every fit, from this fit's costs

    def _trainable(self, pl_module: pl.LightningModule) -> tuple[list[str], list[torch.nn.Parameter]]:
        """Names and parameters that require gradients, cached per fit (walking ``named_parameters()`` costs
        ~0.1 ms a step on a small model). Parameters frozen later simply have no gradient and drop out."""
        if self._parameters is None:
            named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            self._parameters = ([n for n, _ in named], [p for _, p in named])
        return self._parameters

    def _resolve_groups(self, names: list[str], gradient: Tensor) -> None:
        """Layer groups of the parameters that have gradients (again whenever that set changes), the gradients'
        device (the model reached it after construction, or a resume) and the norm's accumulation dtype."""
        device = gradient.device
        self._resolved_names = names
        # one fused pass, accumulated in float32 even for bf16/fp16 gradients (float64 stays float64)
        wide = gradient.dtype in (torch.float32, torch.float64)
        self._norm_dtype = {} if wide else {"dtype": torch.float32}
        if self.grad_detector.device != device:
            self.grad_detector.to(device)
            self.loss_detector.to(device)
        if self.groups is False:
            blocks: dict[str, list[str]] = {}
        elif self.groups is None:
            blocks = top_level_blocks(names)
        else:
            blocks = {g: [n for n in names if re.search(pattern, n)] for g, pattern in self.groups.items()}
        self._group_names = list(blocks)
        # one column per group; a parameter can belong to several groups given by regex
        index = torch.zeros(len(names), max(1, len(blocks)), dtype=torch.float32)
        position = {n: i for i, n in enumerate(names)}
        for j, members in enumerate(blocks.values()):
            for n in members:
                index[position[n], j] = 1.0
        self._group_index = index.to(device)
        self._group_members = [[position[n] for n in members] for members in blocks.values()]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.budget is None:
            self._read_gradients(trainer, pl_module)
            return
        started = time.perf_counter()
        self._read_gradients(trainer, pl_module)
        elapsed = time.perf_counter() - started
        self._step_seconds += elapsed
        self.budget.charge(elapsed)

    def _read_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs every step, so it is kept lean: on a small model each attribute walk or scalar tensor op here is a
        # measurable part of the step (see benchmarks/overhead.py).
        step = trainer.global_step
        if self._current is not None and self._current[0] == step:
            return  # several optimizers (manual optimization): the first one's gradients define the step
        if self.stride > 1 and step % self.stride and step % self._every_n(trainer):
            self._current = (step, None, None)  # budget mode skips this step's gradients; the loss is still scored
            return
        names, params = self._trainable(pl_module)
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
        if names is not self._resolved_names and names != self._resolved_names:
            self._resolve_groups(names, grads[0])
        per_tensor = torch._foreach_norm(grads, 2, **self._norm_dtype)  # one fused pass
        detector = self.grad_detector
        if detector.on_host:
            # CPU: plain floats; each scalar tensor op costs ~5 us, more than this arithmetic (and reading the norms
            # one by one is cheaper than stacking them into one tensor first, measured in a real loop)
            if self._sharded:
                # each rank holds a shard of every gradient: the squares of the shards add up to the squares
                squares = distributed.all_reduce_sum(torch.stack(per_tensor).double() ** 2).tolist()
            elif len(per_tensor) <= 12:
                squares = [float(v) ** 2 for v in per_tensor]
            else:  # many tensors: one stack and one readback beat reading each (crossover ~12, measured)
                squares = [v * v for v in torch.stack(per_tensor).tolist()]
            total = math.sqrt(sum(squares))
            clip_to = float(detector.clip_value()) if self.clip else math.nan
            z, spike, bad = detector.update_float(total)
            if self.clip and spike:
                torch._foreach_mul_(grads, clip_to / max(total, 1e-30))
            self._current = (step, (total, z, spike, bad, squares), None)
        else:
            squares_t = torch.stack(per_tensor).double() ** 2
            if self._sharded:
                squares_t = distributed.all_reduce_sum(squares_t)
            total_t = squares_t.sum().sqrt()
            clip_to_t = detector.clip_value()
            z_t, spike_t, bad_t = detector.update(total_t)
            record = torch.full((_WIDTH,), math.nan, dtype=torch.float64, device=total_t.device)
            record[_GRAD_NORM], record[_GRAD_Z] = total_t, z_t
            record[_GRAD_SPIKE], record[_GRAD_BAD] = spike_t.double(), bad_t.double()
            if self.clip:
                # decided on the device, no sync: exactly 1.0 without a spike, and x * 1.0 == x bitwise
                coefficient = torch.where(spike_t, clip_to_t / total_t.clamp_min(1e-30), torch.ones_like(total_t))
                torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
                record[_CLIPPED] = spike_t.double()
            self._current = (step, record, (squares_t.float() @ self._group_index).sqrt())
        # gradients are identical on every rank after DDP's all-reduce, so every rank decides the same
        if self.track_update and self._is_logged_step(trainer, step):
            self._snapshot = [p.detach().clone() for p in params]

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
        """Score the loss and decide on the step. Returns ``None`` while accumulating, else what kind of step it was
        (``_SKIPPED``, ``_READ`` or ``_LOGGED``), for budget mode's cost tallies."""
        loss = self._extract_loss(outputs)
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        current = self._current
        if current is None or trainer.global_step == current[0]:
            return None  # accumulating: the optimizer has not stepped yet
        self._current = None
        step, payload, group_norms = current
        # Lightning divides the loss by accumulate_grad_batches, so the sum over micro-batches is the step mean
        step_loss, self._loss_sum = (self._loss_sum if self.watch_loss else None), None
        logged = self._is_logged_step(trainer, step)
        if payload is None and not logged and self.grad_detector.on_host:
            # a step whose gradients budget mode skipped: its loss is scored with the next step that reads them
            # (a batch of floats is much cheaper than the same work spread over steps); alerts name their own step
            self._deferred_losses.append((step, step_loss))
            return _SKIPPED
        if step_loss is not None and self._world_size > 1:
            step_loss = distributed.all_reduce_mean(step_loss.detach().double().reshape(()).clone())
        update = None
        if self._snapshot is not None:
            update = self._update_size(pl_module)
            self._snapshot = None
        if self.grad_detector.on_host:
            fired = self._drain_deferred_losses(trainer)
            current_fired = self._finish_host_step(trainer, step, payload, step_loss, update, logged)
            # at every step that reads the gradients, on every rank (under DDP with on_alert="stop" this is a
            # collective, and ranks need not agree on a spike when some parameters are rank-local)
            self.decide_stop(trainer, bool(fired) or bool(current_fired))
        else:
            if payload is None:
                payload, group_norms = self._blank_record()
            if step_loss is not None:
                z_t, spike_t, bad_t = self.loss_detector.update(step_loss.detach().double().reshape(()))
                payload[_LOSS], payload[_LOSS_Z] = step_loss, z_t
                payload[_LOSS_SPIKE], payload[_LOSS_BAD] = spike_t.double(), bad_t.double()
            if update is not None:
                payload[_UPDATE], payload[_PARAM] = update
            self._records.append((step, payload, group_norms))
            if logged:
                self._flush(trainer)
        if self.budget is not None and logged:
            self._decide_stride(trainer, step)
        return _LOGGED if logged else (_READ if current[1] is not None else _SKIPPED)

    def _drain_deferred_losses(self, trainer: pl.Trainer) -> bool | None:
        """Score the losses of the steps budget mode skipped, in step order (host path); ``None`` when nothing
        needed a decision. Collective under DDP (one all-reduce for the whole batch)."""
        if not self._deferred_losses:
            return None
        started = time.perf_counter()
        try:
            return self._score_deferred_losses(trainer)
        finally:
            self._drain_seconds += time.perf_counter() - started

    def _score_deferred_losses(self, trainer: pl.Trainer) -> bool | None:
        deferred, self._deferred_losses = self._deferred_losses, []
        if all(loss is None for _, loss in deferred):
            return None  # watch_loss=False, or no step returned a loss
        # one-element tensors on the CPU: float() is the cheapest read (a step without a loss: a placeholder, the
        # same on every rank, so the all-reduce lines up)
        values = [math.nan if loss is None else float(loss) for _, loss in deferred]
        if self._world_size > 1:
            values = distributed.all_reduce_mean(torch.tensor(values, dtype=torch.float64)).tolist()
        fired = None
        for (step, loss), value in zip(deferred, values, strict=True):
            outcome = self._finish_host_step(trainer, step, None, None if loss is None else value, None, False)
            if outcome is not None:
                fired = bool(fired) or outcome
        return fired

    def _finish_host_step(
        self,
        trainer: pl.Trainer,
        step: int,
        payload: tuple[float, float, bool, bool, list[float]] | None,
        step_loss: Tensor | float | None,
        update: tuple[Tensor, Tensor] | None,
        logged: bool,
    ) -> bool | None:
        """The CPU path of one step, in floats. Returns whether an alert fired, or ``None`` for the common step
        (no spike, no rise, not logged), for which no row is built and nothing is logged."""
        loss = loss_z = math.nan
        loss_spike = loss_bad = False
        if step_loss is not None:
            loss = float(step_loss)
            loss_z, loss_spike, loss_bad = self.loss_detector.update_float(loss)
        if payload is None:  # budget mode skipped this step's gradients
            total = z = math.nan
            spike = bad = growing = False
            squares: list[float] = []
        else:
            total, z, spike, bad, squares = payload
            growing = self.growth_rule is not None and self.growth_rule.update(z)
        if not (logged or spike or bad or loss_spike or loss_bad or growing):
            return None
        row = [math.nan] * _WIDTH
        row[_GRAD_NORM], row[_GRAD_Z], row[_GRAD_SPIKE], row[_GRAD_BAD] = total, z, float(spike), float(bad)
        row[_CLIPPED] = float(spike and self.clip)
        row[_LOSS], row[_LOSS_Z], row[_LOSS_SPIKE], row[_LOSS_BAD] = loss, loss_z, float(loss_spike), float(loss_bad)
        if update is not None:
            row[_UPDATE], row[_PARAM] = float(update[0]), float(update[1])
        group_row = [math.sqrt(sum(squares[i] for i in members)) for members in self._group_members] if squares else []
        return self._handle_step(trainer, step, row, group_row, growing)

    def _update_size(self, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor] | None:
        """Norm of the update the optimizer just applied (against the snapshot) and of the parameters."""
        params = [p.detach() for p in self._trainable(pl_module)[1] if p.grad is not None]
        if len(params) != len(self._snapshot):
            return None
        delta = torch._foreach_sub(params, self._snapshot)
        update = torch.stack(torch._foreach_norm(delta, 2, dtype=torch.float32)).double().norm()
        size = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).double().norm()
        return update, size

    def _blank_record(self) -> tuple[Tensor, Tensor]:
        """Device path: the record of a step whose gradients budget mode skipped (NaN values, no spike, no clip)."""
        device = self.loss_detector.device
        record = torch.full((_WIDTH,), math.nan, dtype=torch.float64, device=device)
        record[[_GRAD_SPIKE, _GRAD_BAD, _CLIPPED]] = 0.0
        width = self._group_index.shape[1] if self._group_index is not None else 1
        return record, torch.full((width,), math.nan, dtype=torch.float32, device=device)

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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grad_detector.on_host:
            self.decide_stop(trainer, bool(self._drain_deferred_losses(trainer)))
        self._flush(trainer)

    # -------------------------------------------------------------------------------------------- internals
    def _is_logged_step(self, trainer: pl.Trainer, step: int) -> bool:
        return step % self._every_n(trainer) == 0

    @staticmethod
    def _extract_loss(outputs: Any) -> Tensor | None:
        if type(outputs) is dict or isinstance(outputs, Mapping):  # (the exact-type test skips the ABC machinery)
            outputs = outputs.get("loss")
        return outputs.detach() if isinstance(outputs, Tensor) and outputs.numel() == 1 else None

    def _flush(self, trainer: pl.Trainer) -> None:
        """Device path: read the pending records back (one host transfer) and log and decide on them."""
        if not self._records:
            return
        steps = [s for s, _, _ in self._records]
        rows = torch.stack([r for _, r, _ in self._records]).cpu().tolist()
        groups = torch.stack([g for _, _, g in self._records]).cpu().tolist()
        self._records = []
        fired = False
        for step, row, group_row in zip(steps, rows, groups, strict=True):
            # NaN z: a step whose gradients budget mode skipped (a non-finite norm has z = 0)
            read = not math.isnan(row[_GRAD_Z])
            growing = self.growth_rule is not None and read and self.growth_rule.update(row[_GRAD_Z])
            fired |= self._handle_step(trainer, step, row, group_row if read else [], growing)
        self.decide_stop(trainer, fired)

    def _handle_step(
        self, trainer: pl.Trainer, step: int, row: list[float], group_row: list[float], growing: bool
    ) -> bool:
        """Log and alert on one step's row (``growing``: the ``grad_growth`` rule fired at this step)."""
        p = self.prefix
        grad_spike, grad_bad = row[_GRAD_SPIKE] > 0, row[_GRAD_BAD] > 0
        loss_spike, loss_bad = row[_LOSS_SPIKE] > 0, row[_LOSS_BAD] > 0
        self.clip_count += int(row[_CLIPPED] > 0)
        event = grad_spike or grad_bad or loss_spike or loss_bad
        read = not math.isnan(row[_GRAD_Z])  # False on a step budget mode skipped (z is 0, not NaN, for a NaN norm)
        metrics: dict[str, float] = {}
        if event or self._is_logged_step(trainer, step):
            if read:
                metrics = {
                    f"{p}/grad/norm": row[_GRAD_NORM],
                    f"{p}/grad/zscore": row[_GRAD_Z],
                    f"{p}/grad/spike": float(grad_spike),
                }
                metrics.update({f"{p}/grad/norm/{g}": v for g, v in zip(self._group_names, group_row, strict=False)})
            if self.watch_loss:
                metrics.update(
                    {
                        f"{p}/loss/value": row[_LOSS],
                        f"{p}/loss/zscore": row[_LOSS_Z],
                        f"{p}/loss/spike": float(loss_spike),
                    }
                )
            if not math.isnan(row[_UPDATE]):
                metrics[f"{p}/update/norm"] = row[_UPDATE]
                metrics[f"{p}/update/ratio"] = row[_UPDATE] / max(row[_PARAM], 1e-30)
            if self.clip:
                metrics[f"{p}/grad/clipped"] = float(self.clip_count)
            if self.budget is not None:
                metrics[f"{p}/grad/stride"] = float(self.stride)
        if grad_spike:
            metrics[f"{p}/events/grad_spike"] = row[_GRAD_Z]
        if loss_spike:
            metrics[f"{p}/events/loss_spike"] = row[_LOSS_Z]
        if metrics:
            self.last_metrics = metrics
            self.log_metrics(trainer, metrics, step)
        source = type(self).__name__
        if grad_bad or loss_bad:
            what = "gradient norm" if grad_bad else "loss"
            value = row[_GRAD_NORM] if grad_bad else row[_LOSS]
            self.emit_alert(
                trainer,
                Alert(
                    step,
                    "non_finite",
                    source,
                    f"{p}/grad/norm" if grad_bad else f"{p}/loss/value",
                    value,
                    math.inf,
                    f"the {what} is {value} at step {step}: training has diverged or a batch is corrupt.",
                ),
            )
        if grad_spike:
            self.emit_alert(
                trainer,
                Alert(
                    step,
                    "grad_spike",
                    source,
                    f"{p}/grad/zscore",
                    row[_GRAD_Z],
                    self.z_threshold,
                    f"gradient norm {row[_GRAD_NORM]:.4g} is {row[_GRAD_Z]:.1f} standard deviations (log scale) above "
                    f"its running mean{' and was clipped' if self.clip else ''}.",
                ),
            )
        if growing:
            self.emit_alert(
                trainer,
                Alert(
                    step,
                    "grad_growth",
                    source,
                    f"{p}/grad/zscore",
                    row[_GRAD_Z],
                    self.growth_z,
                    f"the gradient norm ({row[_GRAD_NORM]:.4g}) has stayed more than {self.growth_z:g} standard "
                    f"deviations (log scale) above its running mean for {self.growth_patience} steps: a sustained "
                    "rise, not a one-step spike (for example a learning rate past the edge of stability).",
                ),
            )
        if loss_spike:
            self.emit_alert(
                trainer,
                Alert(
                    step,
                    "loss_spike",
                    source,
                    f"{p}/loss/zscore",
                    row[_LOSS_Z],
                    self.z_threshold,
                    f"loss {row[_LOSS]:.4g} is {row[_LOSS_Z]:.1f} standard deviations (log scale) above its "
                    "running mean.",
                ),
            )
        return event or growing
