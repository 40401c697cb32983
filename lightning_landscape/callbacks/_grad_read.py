"""GradientSpikeMonitor's gradient reading: which parameters, their layer groups, the per-tensor squared norms and
the ``nlm_alignment`` terms, and the readback. One path on host and device alike: the values are computed where the
gradients live and put in the step's record; on the CPU (and with ``clip=True``) they are read back at once, on an
accelerator at the next logged step, all records in one transfer (:func:`_readback`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape.callbacks._grad_records import _Read, _Step, _Stream
from lightning_landscape.core import distributed
from lightning_landscape.core.params import top_level_blocks

_COMPILED = "_orig_mod."  # torch.compile's wrapper inserts this into parameter names


class _GradReading:
    """Mixin of :class:`~lightning_landscape.callbacks.grad_spikes.GradientSpikeMonitor`: reads one optimizer's
    gradients at ``on_before_optimizer_step`` into the step's record."""

    def _read_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs every step, so it is kept lean: on a small model each attribute walk or scalar tensor op here is a
        # measurable part of the step (see benchmarks/grad_spikes.py).
        step = self._step(trainer)
        record = self._open
        if record is None or record.step != step:
            logged = self._is_logged_step(trainer, step)
            record = self._open = _Step(step, logged=logged)
            samples = self._samples[1] if self._samples[0] == step else 0
            if samples:
                self._usual_samples = max(self._usual_samples, samples)
                record.weight = samples / self._usual_samples
            # budget mode skips the gradients of most steps (never during the warm-up, never a logged step)
            stride = self.stride
            if stride > 1 and not logged and step % stride and int(self.grad_detector._count) >= self.warmup_steps:
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
        # logged steps only: stays on the device (sharded: the shards' terms add up, reduced with the squares)
        nlm = _nlm_terms(grads, params, stream.norm_dtype) if record.logged else None
        now = (self._host and not self._defer) or self.clip
        if now and self._host and not self._sharded and len(per_tensor) <= 12:
            # CPU, few tensors: plain floats (each scalar tensor op costs ~5 us there; for 4 tensors this is 1.6 us
            # against 13-19 us for stack-square-tolist, measured with timeit)
            squares: list[float] | Tensor = [float(v) ** 2 for v in per_tensor]
        else:
            squares = torch.stack(per_tensor).double() ** 2
            if self._sharded and nlm is not None:  # shards' squares, dots and parameter squares all add up: one
                # collective for the three (n squares, then <g, theta>, ||theta||^2)
                both = distributed.all_reduce_sum(torch.cat([squares, nlm]))
                squares, nlm = both[:-2], both[-2:]
            elif self._sharded:  # each rank holds a shard of every gradient: the squares of the shards add up
                squares = distributed.all_reduce_sum(squares)
        read = _Read(index, squares, nlm=nlm)
        record.reads.append(read)
        if now:
            # read back and scored now, before the update: on the CPU (no sync to avoid), and with clip=True
            # everywhere (it decides before the optimizer step). Accelerators otherwise: at the next logged step
            _readback([read])
            clip_to = self._score_read(trainer, record, read)
            if clip_to is not None:
                torch._foreach_mul_(grads, clip_to / max(read.scored["total"], 1e-30))
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

    def _update_size(self) -> Tensor:
        """Norms of the update the optimizer just applied (against the snapshot) and of the parameters, stacked (read
        back in one transfer)."""
        params, before = self._snapshot
        params = [p.detach() for p in params]
        delta = torch._foreach_sub(params, before)
        # float32 accumulation for bf16/fp16; float64 parameters keep float64 (a float32 dtype would be a narrowing)
        wide = {} if params[0].dtype in (torch.float32, torch.float64) else {"dtype": torch.float32}
        update = torch.stack(torch._foreach_norm(delta, 2, **wide)).double().norm()
        size = torch.stack(torch._foreach_norm(params, 2, **wide)).double().norm()
        return torch.stack([update, size])


def _readback(reads: list[_Read]) -> None:
    """Bring the values of ``reads`` still in tensors to the host as floats, in one transfer (at once on the CPU and
    with ``clip=True``; at the flush of a logged step on accelerators)."""
    pending = [t.reshape(-1) for r in reads for t in (r.squares, r.nlm) if isinstance(t, Tensor)]
    if not pending:
        return
    values = torch.cat(pending).cpu().tolist()
    offset = 0
    for r in reads:
        if isinstance(r.squares, Tensor):
            n = r.squares.numel()
            r.squares, offset = values[offset : offset + n], offset + n
        if isinstance(r.nlm, Tensor):
            r.nlm, offset = (values[offset], values[offset + 1]), offset + 2


def _reduce_losses(steps: list[_Step], world_size: int) -> None:
    """The steps' losses as floats, averaged over ranks: one all-reduce and one transfer for all of them."""
    losses = [s for s in steps if s.loss is not None]
    if not losses:
        return
    # host scalars: float() is the cheapest read; accelerators: one stack and one transfer
    if world_size == 1 and all(isinstance(s.loss, float) or s.loss.device.type == "cpu" for s in losses):
        values = [float(s.loss) for s in losses]
    else:
        where = next((s.loss.device for s in losses if isinstance(s.loss, Tensor)), torch.device("cpu"))
        stacked = torch.stack([torch.as_tensor(s.loss, dtype=torch.float64, device=where).reshape(()) for s in losses])
        if world_size > 1:
            stacked = distributed.all_reduce_mean(stacked)
        values = stacked.cpu().tolist()
    for s, value in zip(losses, values, strict=True):
        s.loss = value


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
