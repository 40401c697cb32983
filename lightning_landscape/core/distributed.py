"""Collectives that are no-ops without an initialised process group.

Core code calls these so the same function runs in one process and under DDP. Callers must make sure every rank
reaches a collective (decisions are taken from reduced values, which are identical on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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


REDUCE_OPS = ("sum", "max", "min")


def _identity(op: str, dtype: torch.dtype) -> float | int:
    """The value that leaves ``op`` unchanged: what a rank that did not record a name contributes."""
    if op == "sum":
        return 0
    if dtype.is_floating_point:
        return -math.inf if op == "max" else math.inf
    info = torch.iinfo(dtype)
    return info.min if op == "max" else info.max


def all_reduce_named(values: Mapping[str, tuple[Tensor, str]]) -> dict[str, Tensor]:
    """Reduce named tensors over ranks, each with its declared op, matched by name (never by position).

    Args:
        values: ``{name: (tensor, op)}`` with ``op`` one of :data:`REDUCE_OPS`. Ranks may hold different names
            (one rank's model skipped a module): the result holds the union of the names, and a rank without a
            name contributes the op's identity (0 for ``"sum"``, ``-inf`` for ``"max"``, ``+inf`` for ``"min"``).

    Returns:
        ``{name: reduced tensor}`` (new tensors; the inputs are not changed), identical on every rank. In one
        process: copies of the inputs.

    Every rank must call it at the same point (it is a collective even when a rank has no names). Cost: one
    ``all_gather_object`` of the ``(name, op, shape, dtype)`` declarations, then one ``all_reduce`` per
    (op, dtype) group of the flattened tensors, in name order, so the packing is derived from the agreed names
    on every rank alike.

    Raises:
        ValueError: an op is not one of :data:`REDUCE_OPS`, or ranks declared one name with different ops, shapes
            or dtypes.
    """
    declared = {}
    for name, (tensor, op) in values.items():
        if op not in REDUCE_OPS:
            raise ValueError(f"`values[{name!r}]` op must be one of {REDUCE_OPS}, got {op!r}.")
        declared[name] = (op, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    if not is_distributed():
        return {name: tensor.clone() for name, (tensor, _) in values.items()}
    union: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for rank_declared in all_gather_object(declared):
        for name, declaration in rank_declared.items():
            if union.setdefault(name, declaration) != declaration:
                raise ValueError(
                    f"all_reduce_named: ranks declared {name!r} differently: {union[name]} and {declaration} "
                    "(op, shape, dtype)."
                )
    device = next((t.device for t, _ in values.values()), None)
    if device is None:  # this rank recorded nothing: contribute identities on the backend's device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(union):
        op, _, dtype = union[name]
        groups.setdefault((op, dtype), []).append(name)
    result: dict[str, Tensor] = {}
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    for (op, dtype_name), names in sorted(groups.items()):
        dtype = getattr(torch, dtype_name)
        parts = []
        for name in names:
            shape = union[name][1]
            if name in values:
                parts.append(values[name][0].detach().to(device=device, dtype=dtype).reshape(-1))
            else:
                parts.append(torch.full((math.prod(shape),), _identity(op, dtype), dtype=dtype, device=device))
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
        dist.all_reduce(flat, op=ops[op])
        offset = 0
        for name in names:
            shape = union[name][1]
            size = math.prod(shape)
            result[name] = flat[offset : offset + size].reshape(shape)
            offset += size
    return result
