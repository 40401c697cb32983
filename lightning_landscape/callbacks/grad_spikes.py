"""GradientSpikeMonitor: gradient-norm, loss and update-size spikes, every optimizer step, without host syncs."""

from __future__ import annotations

import math
import re
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

    Alerts: ``grad_spike``, ``loss_spike``, ``non_finite`` (NaN/inf gradient norm or loss, at once), and
    ``grad_growth``: the gradient z-score stayed above ``growth_z`` for ``growth_patience`` consecutive steps.
    That is a sustained rise rather than a one-step spike, the signature of a run drifting past the edge of
    stability: in ``benchmarks/early_warning.py`` it fired 100+ steps before a full-batch run diverged, where the
    spike rule fires at the blow-up; on 50,000 stationary steps (10-50% noise) it never fired.

    Cost per step: one fused norm pass over the gradients in float32 (``torch._foreach_norm``) and a few scalar
    tensor ops; no host sync between readbacks. ``track_update`` copies the parameters once per logged step.

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
        self._loss_step = -1
        self._snapshot: list[Tensor] | None = None
        self._parameters: list[tuple[str, torch.nn.Parameter]] | None = None
        self._sharded = False

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "grad_detector": self.grad_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "clip_count": self.clip_count,
            "growth_rule": self.growth_rule.state_dict() if self.growth_rule is not None else None,
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        if "grad_detector" in state:
            self.grad_detector.load_state_dict(state["grad_detector"])
            self.loss_detector.load_state_dict(state["loss_detector"])
        self.clip_count = int(state.get("clip_count", 0))
        if self.growth_rule is not None and state.get("growth_rule") is not None:
            self.growth_rule.load_state_dict(state["growth_rule"])

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """No probe set: this monitor reads the training step itself (its hooks' time is charged to the budget)."""
        if self.budget is not None:
            self.budget.start(trainer.global_step)

    def _every_n(self, trainer: pl.Trainer) -> int:
        return self._every or max(1, trainer.log_every_n_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._parameters = None
        self._sharded = is_sharded(trainer.strategy)

    def _trainable(self, pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        # Walking named_parameters() costs ~0.1 ms a step on a small model: cache it (reset at every fit start).
        # Parameters frozen later simply have no gradient and drop out below.
        if self._parameters is None:
            self._parameters = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        return self._parameters

    def _resolve_groups(self, names: list[str], device: torch.device) -> None:
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
        self.budget.charge(time.perf_counter() - started)

    def _read_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._current is not None and self._current[0] == step:
            return  # several optimizers (manual optimization): the first one's gradients define the step
        named = [(n, p) for n, p in self._trainable(pl_module) if p.grad is not None]
        if not named:
            return
        names = [n for n, _ in named]
        grads = [p.grad for _, p in named]
        device = grads[0].device
        if self._group_index is None or self._group_index.shape[0] != len(names):
            self._resolve_groups(names, device)
        if self.grad_detector.device != device:  # the model reached its device after construction / a resume
            self.grad_detector.to(device)
            self.loss_detector.to(device)
        # one fused pass, accumulated in float32 even for bf16/fp16 gradients
        wide = grads[0].dtype in (torch.float32, torch.float64)
        per_tensor = torch._foreach_norm(grads, 2) if wide else torch._foreach_norm(grads, 2, dtype=torch.float32)
        detector = self.grad_detector
        group_norms: list[float] | Tensor
        if detector.on_host and not self._sharded:
            # CPU: plain floats; each scalar tensor op costs ~5 us, more than this arithmetic (and reading the norms
            # one by one is ~20 us a step cheaper than stacking them into one tensor first, measured in a real loop)
            squares_list = [float(v) ** 2 for v in per_tensor]
            total_f = math.sqrt(sum(squares_list))
            group_norms = [math.sqrt(sum(squares_list[i] for i in members)) for members in self._group_members]
        else:
            squares = torch.stack(per_tensor).double() ** 2
            if self._sharded:
                # each rank holds a shard of every gradient: the squares of the shards add up to the squares
                squares = distributed.all_reduce_sum(squares)
            total = squares.sum().sqrt()
            group_norms = (squares.float() @ self._group_index).sqrt()
            total_f = float(total) if detector.on_host else math.nan
        if detector.on_host:
            clip_to = float(detector.clip_value()) if self.clip else math.nan
            z, spike, bad = detector.update_float(total_f)
            record: list[float] | Tensor = [math.nan] * _WIDTH
            record[_GRAD_NORM], record[_GRAD_Z], record[_GRAD_SPIKE], record[_GRAD_BAD] = total_f, z, spike, bad
            if self.clip:
                record[_CLIPPED] = float(spike)
                if spike:
                    torch._foreach_mul_(grads, clip_to / max(total_f, 1e-30))
        else:
            clip_to_t = detector.clip_value()
            z_t, spike_t, bad_t = detector.update(total)
            record = torch.full((_WIDTH,), math.nan, dtype=torch.float64, device=device)
            record[_GRAD_NORM], record[_GRAD_Z] = total, z_t
            record[_GRAD_SPIKE], record[_GRAD_BAD] = spike_t.double(), bad_t.double()
            if self.clip:
                # decided on the device, no sync: exactly 1.0 without a spike, and x * 1.0 == x bitwise
                coefficient = torch.where(spike_t, clip_to_t / total.clamp_min(1e-30), torch.ones_like(total))
                torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
                record[_CLIPPED] = spike_t.double()
        # gradients are identical on every rank after DDP's all-reduce, so every rank decides the same
        self._current = (step, record, group_norms)
        if self.track_update and self._is_logged_step(trainer, step):
            self._snapshot = [p.detach().clone() for _, p in named]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.budget is None:
            self._finish_step(trainer, pl_module, outputs)
            return
        started = time.perf_counter()
        self._finish_step(trainer, pl_module, outputs)
        self.budget.charge(time.perf_counter() - started)

    def _finish_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        loss = self._extract_loss(outputs)
        if loss is not None:
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        if self._current is None or trainer.global_step == self._current[0]:
            return  # accumulating: the optimizer has not stepped yet
        step, record, group_norms = self._current
        self._current = None
        if self.watch_loss and self._loss_sum is not None:
            # Lightning divides the loss by accumulate_grad_batches, so the sum over micro-batches is the step mean
            step_loss = self._loss_sum
            if trainer.world_size > 1:
                step_loss = distributed.all_reduce_mean(step_loss.detach().double().reshape(()).clone())
            if isinstance(record, list):
                value = float(step_loss)
                z, spike, bad = self.loss_detector.update_float(value)
                record[_LOSS], record[_LOSS_Z], record[_LOSS_SPIKE], record[_LOSS_BAD] = value, z, spike, bad
            else:
                z_t, spike_t, bad_t = self.loss_detector.update(step_loss.detach().double().reshape(()))
                record[_LOSS], record[_LOSS_Z] = step_loss, z_t
                record[_LOSS_SPIKE], record[_LOSS_BAD] = spike_t.double(), bad_t.double()
        self._loss_sum = None
        if self._snapshot is not None:
            params = [p.detach() for _, p in self._trainable(pl_module) if p.grad is not None]
            if len(params) == len(self._snapshot):
                delta = torch._foreach_sub(params, self._snapshot)
                update = torch.stack(torch._foreach_norm(delta, 2, dtype=torch.float32)).double().norm()
                size = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32)).double().norm()
                record[_UPDATE], record[_PARAM] = (
                    (float(update), float(size)) if isinstance(record, list) else (update, size)
                )
            self._snapshot = None
        if isinstance(record, list) and not self._records:
            # host path (CPU): nothing pending, so decide on this step at once without the batching of _flush
            self.decide_stop(trainer, self._handle_step(trainer, step, record, group_norms))
            return
        self._records.append((step, record, group_norms))
        if isinstance(record, list) or self._is_logged_step(trainer, step):
            self._flush(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    # -------------------------------------------------------------------------------------------- internals
    def _is_logged_step(self, trainer: pl.Trainer, step: int) -> bool:
        return step % self._every_n(trainer) == 0

    @staticmethod
    def _extract_loss(outputs: Any) -> Tensor | None:
        if isinstance(outputs, Mapping):
            outputs = outputs.get("loss")
        return outputs.detach() if isinstance(outputs, Tensor) and outputs.numel() == 1 else None

    def _flush(self, trainer: pl.Trainer) -> None:
        """Read the pending records back (one host transfer) and log and decide on them."""
        if not self._records:
            return
        steps = [s for s, _, _ in self._records]
        if isinstance(self._records[0][1], list):
            rows = [r for _, r, _ in self._records]
        else:  # the one host transfer of this window
            rows = torch.stack([r for _, r, _ in self._records]).cpu().tolist()
        if isinstance(self._records[0][2], list):
            groups = [g for _, _, g in self._records]
        else:
            groups = torch.stack([g for _, _, g in self._records]).cpu().tolist()
        self._records = []
        fired = False
        for step, row, group_row in zip(steps, rows, groups, strict=True):
            fired |= self._handle_step(trainer, step, row, group_row)
        self.decide_stop(trainer, fired)

    def _handle_step(self, trainer: pl.Trainer, step: int, row: list[float], group_row: list[float]) -> bool:
        p = self.prefix
        grad_spike, grad_bad = row[_GRAD_SPIKE] > 0, row[_GRAD_BAD] > 0
        loss_spike, loss_bad = row[_LOSS_SPIKE] > 0, row[_LOSS_BAD] > 0
        self.clip_count += int(row[_CLIPPED] > 0)
        event = grad_spike or grad_bad or loss_spike or loss_bad
        metrics: dict[str, float] = {}
        if event or self._is_logged_step(trainer, step):
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
        # a spike step (z > z_threshold) also counts towards a sustained rise
        growing = self.growth_rule is not None and self.growth_rule.update(row[_GRAD_Z])
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
