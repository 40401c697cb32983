"""Collectives that are no-ops without an initialised process group.

Core code calls these so the same function runs in one process and under DDP. Callers must make sure every rank
reaches a collective (decisions are taken from reduced values, which are identical on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def average_batchnorm_statistics(module: torch.nn.Module) -> None:
    """In place: every BatchNorm running mean and variance of ``module`` averaged over the ranks (no-op without a
    process group). After each rank re-estimated them on its own probe slice of equal size, the mean over ranks is
    the estimate over all batches (the interpolation path and the Hessian-axes surface both need it)."""
    if not is_distributed():
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._NormBase) and layer.track_running_stats:
            all_reduce_mean(layer.running_mean)
            all_reduce_mean(layer.running_var)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place, returned (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value and return it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


#: The declared reductions: element-wise sum, maximum, minimum over ranks, or concatenation along dim 0 in rank order.
REDUCE_OPS = ("sum", "max", "min", "cat")
_COLLECTIVE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _identity(op: str, dtype: torch.dtype) -> float | int:
    """The value that leaves ``op`` unchanged: what a rank that did not record a name contributes."""
    if op == "sum":
        return 0
    if dtype.is_floating_point:
        return -math.inf if op == "max" else math.inf
    info = torch.iinfo(dtype)
    return info.min if op == "max" else info.max


def _declaration(name: str, tensor: Tensor, op: str) -> tuple[str, tuple[int, ...], str]:
    if op not in REDUCE_OPS:
        raise ValueError(f"`values[{name!r}]` op must be one of {REDUCE_OPS}, got {op!r}.")
    if op == "cat" and tensor.dim() == 0:
        raise ValueError(f"`values[{name!r}]`: op 'cat' needs a tensor with a dim 0, got a 0-d tensor.")
    return op, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _agreed(declared: list[dict[str, tuple[str, tuple[int, ...], str]]]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """The union of every rank's declarations; a name must have one op, dtype and shape (for ``"cat"``: one shape
    after dim 0) on every rank that declared it."""
    union: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for rank_declared in declared:
        for name, declaration in rank_declared.items():
            op, shape, dtype = declaration
            key = (op, shape[1:] if op == "cat" else shape, dtype)
            seen = union.setdefault(name, declaration)
            if (seen[0], seen[1][1:] if seen[0] == "cat" else seen[1], seen[2]) != key:
                raise ValueError(
                    f"all_reduce_named: ranks declared {name!r} differently: {seen} and {declaration} "
                    "(op, shape, dtype)."
                )
    return union


def all_reduce_named(values: Mapping[str, tuple[Tensor, str]]) -> dict[str, Tensor]:
    """Reduce named tensors over ranks, each with its declared op, matched by name (never by position).

    Args:
        values: ``{name: (tensor, op)}`` with ``op`` one of :data:`REDUCE_OPS`. Ranks may hold different names
            (one rank's model skipped a module): the result holds the union of the names, and a rank without a
            name contributes the op's identity (0 for ``"sum"``, ``-inf`` for ``"max"``, ``+inf`` for ``"min"``,
            no rows for ``"cat"``). ``"cat"`` joins every rank's rows along dim 0 in rank order; the lengths may
            differ between ranks, the other dims may not.

    Returns:
        ``{name: reduced tensor}`` (new tensors; the inputs are not changed), identical on every rank. In one
        process: copies of the inputs.

    Every rank must call it at the same point (it is a collective even when a rank has no names). Cost: one
    ``all_gather_object`` of the ``(name, op, shape, dtype)`` declarations, then one ``all_reduce`` per
    (op, dtype) group of the flattened tensors, in name order, so the packing is derived from the agreed names
    on every rank alike; and one ``all_gather`` per ``"cat"`` name (rows padded to the longest rank's).

    Raises:
        ValueError: an op is not one of :data:`REDUCE_OPS`, a ``"cat"`` tensor is 0-d, or ranks declared one name
            with different ops, shapes or dtypes.
    """
    declared = {name: _declaration(name, tensor, op) for name, (tensor, op) in values.items()}
    if not is_distributed():
        return {name: tensor.detach().clone() for name, (tensor, _) in values.items()}
    every_rank = all_gather_object(declared)
    union = _agreed(every_rank)
    device = next((t.device for t, _ in values.values()), None)
    if device is None:  # this rank recorded nothing: contribute identities on the backend's device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(union):
        op, _, dtype = union[name]
        groups.setdefault((op, dtype), []).append(name)
    result: dict[str, Tensor] = {}
    for (op, dtype_name), names in sorted(groups.items()):
        dtype = getattr(torch, dtype_name)
        if op == "cat":
            for name in names:
                lengths = [r[name][1][0] if name in r else 0 for r in every_rank]
                result[name] = _all_gather_rows(values.get(name), lengths, union[name][1][1:], dtype, device)
            continue
        parts = []
        for name in names:
            shape = union[name][1]
            if name in values:
                parts.append(values[name][0].detach().to(device=device, dtype=dtype).reshape(-1))
            else:
                parts.append(torch.full((math.prod(shape),), _identity(op, dtype), dtype=dtype, device=device))
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _COLLECTIVE_OPS[op]))
        offset = 0
        for name in names:
            shape = union[name][1]
            size = math.prod(shape)
            result[name] = flat[offset : offset + size].reshape(shape)
            offset += size
    return result


def _all_gather_rows(
    value: tuple[Tensor, str] | None, lengths: list[int], tail: tuple[int, ...], dtype: torch.dtype, device: Any
) -> Tensor:
    """Every rank's rows (``lengths[r]`` of them, ``tail`` the shape of one) concatenated in rank order."""
    longest = max(lengths)
    padded = torch.zeros((longest, *tail), dtype=dtype, device=device)
    if value is not None and lengths[rank()]:
        padded[: lengths[rank()]] = value[0].detach().to(device=device, dtype=dtype)
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, lengths, strict=True)])


class ReducedState:
    """Named tensors, each with a declared cross-rank reduction: torchmetrics' ``add_state(name, default,
    dist_reduce_fx)`` without the metric around it.

    A measurement declares each piece of state once (:meth:`add_state`, or the first :meth:`update`), adds to it
    locally as often as it likes (``"sum"`` adds, ``"max"``/``"min"`` keep the element-wise extreme, ``"cat"``
    appends rows), and ends with one :meth:`reduce`, a collective that matches the names across ranks
    (:func:`all_reduce_named`): a rank that never recorded a name (its model skipped that module, its batch had
    no such token) neither shifts the others' values nor leaves a rank waiting. In one process :meth:`reduce`
    returns copies.

    Raises:
        ValueError: an op is not one of :data:`REDUCE_OPS`, or a name is updated with another op than declared.
    """

    def __init__(self) -> None:
        self._values: dict[str, Tensor] = {}
        self._ops: dict[str, str] = {}

    def add_state(self, name: str, default: Tensor, dist_reduce_fx: str) -> None:
        """Declare ``name`` with its reduction and its starting value (a copy of ``default``)."""
        if dist_reduce_fx not in REDUCE_OPS:
            raise ValueError(f"`dist_reduce_fx` must be one of {REDUCE_OPS}, got {dist_reduce_fx!r} for {name!r}.")
        self._values[name] = default.detach().clone()
        self._ops[name] = dist_reduce_fx

    def update(self, name: str, value: Tensor, dist_reduce_fx: str) -> None:
        """Combine ``value`` into ``name`` with its op (declaring it with ``value`` on first use)."""
        op = self._ops.get(name)
        if op is None:
            self.add_state(name, value, dist_reduce_fx)
            return
        if op != dist_reduce_fx:
            raise ValueError(f"`dist_reduce_fx` of {name!r} was declared {op!r}, got {dist_reduce_fx!r}.")
        old, value = self._values[name], value.detach()
        if op == "sum":
            self._values[name] = old + value
        elif op == "max":
            self._values[name] = torch.maximum(old, value.to(old.dtype))
        elif op == "min":
            self._values[name] = torch.minimum(old, value.to(old.dtype))
        else:
            self._values[name] = torch.cat([old, value.to(old.dtype)])

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __getitem__(self, name: str) -> Tensor:
        return self._values[name]

    def __len__(self) -> int:
        return len(self._values)

    def declared(self) -> dict[str, tuple[Tensor, str]]:
        """``{name: (local value, op)}``, as :func:`all_reduce_named` takes them."""
        return {name: (value, self._ops[name]) for name, value in self._values.items()}

    def reduce(self, extra: Mapping[str, tuple[Tensor, str]] | None = None) -> dict[str, Tensor]:
        """The union over ranks of every name, reduced by its op (``extra``: more ``(tensor, op)`` pairs reduced
        in the same collective). Every rank must call it at the same point."""
        return all_reduce_named({**self.declared(), **(extra or {})})
