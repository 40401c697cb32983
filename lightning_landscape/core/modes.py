"""The module state a curvature measurement runs in: batch sizes, BatchNorm layers, train/eval modes, seeded RNG.

Shared by the Hessian operator (:mod:`~lightning_landscape.core.hvp`) and the loss interpolation
(:mod:`~lightning_landscape.core.interpolation`): one definition of which layers carry running statistics and of how
a mode is entered and left without a trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape.core._validation import check_choice

Mode = Literal["eval", "train"]
MODES = ("eval", "train")


def default_batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor found in ``batch`` (depth-first through tuples, lists and dicts).

    Raises:
        TypeError: ``batch`` holds no tensor with at least one dimension; pass ``batch_size_fn``.
    """
    if isinstance(batch, Tensor) and batch.dim() > 0:
        return int(batch.shape[0])
    items: Sequence[Any] = ()
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, list | tuple):
        items = batch
    for item in items:
        with contextlib.suppress(TypeError):
            return default_batch_size(item)
    raise TypeError(
        f"Cannot infer the batch size of a {type(batch).__name__}: no tensor with a leading dimension; "
        "pass `batch_size_fn`."
    )


def leading_samples(batch: Any, count: int, batch_size: int, start: int = 0) -> tuple[Any, bool]:
    """``batch`` cut to ``count`` samples from ``start`` (its first ``count`` by default): every tensor whose leading
    dimension is ``batch_size`` keeps rows ``start .. start + count`` (a view, no copy); tuples, lists, named tuples
    and mappings (``BatchEncoding`` included) are rebuilt around the cut tensors; other leaves (strings, scalars,
    tensors of another length) are kept as they are. Returns ``(cut batch, whether any tensor was cut)``; nothing
    is cut when the rows asked are all of them.
    """
    if start <= 0 and count >= batch_size:
        return batch, False
    if isinstance(batch, Tensor):
        if batch.dim() > 0 and batch.shape[0] == batch_size:
            return batch[start : start + count], True
        return batch, False
    if isinstance(batch, Mapping):
        pairs = {key: leading_samples(value, count, batch_size, start) for key, value in batch.items()}
        items = {key: value for key, (value, _) in pairs.items()}
        try:
            rebuilt = type(batch)(items)
        except Exception:  # a mapping type that cannot be built from a dict: a plain dict holds the same items
            rebuilt = items
        return rebuilt, any(cut for _, cut in pairs.values())
    if isinstance(batch, list | tuple):
        pairs = [leading_samples(item, count, batch_size, start) for item in batch]
        items = [value for value, _ in pairs]
        named = isinstance(batch, tuple) and hasattr(batch, "_fields")
        rebuilt = type(batch)(*items) if named else type(batch)(items)
        return rebuilt, any(cut for _, cut in pairs)
    return batch, False


def _norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """Normalisation layers with running statistics (the one definition; core.interpolation uses it too)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


@contextlib.contextmanager
def operator_mode(module: nn.Module, mode: Mode) -> Iterator[None]:
    """Put ``module`` in the operator's mode and restore every submodule's own flag and buffers afterwards.

    ``"eval"``: every submodule in eval mode (running BatchNorm statistics, dropout off).
    ``"train"``: every submodule in train mode; BatchNorm uses the statistics of each batch, and its running
    buffers are detached for the duration so no forward pass updates them (the operator stays the same at every
    matvec and the user's buffers are untouched). Dropout is active; fix its masks with the operator's ``seed``.
    """
    check_choice("mode", mode, MODES)
    flags = {m: m.training for m in module.modules()}
    detached: list[tuple[nn.Module, dict[str, Tensor | None]]] = []
    try:
        module.train(mode == "train")
        if mode == "train":
            for layer in _norm_layers(module):
                saved = {k: layer._buffers.get(k) for k in ("running_mean", "running_var", "num_batches_tracked")}
                detached.append((layer, saved))
                # With the running buffers set to None, _BatchNorm.forward normalises with batch statistics and
                # has nothing to update: the cleanest public-behaviour way to freeze them.
                for k in saved:
                    layer._buffers[k] = None
        yield
    finally:
        for layer, saved in detached:
            for k, v in saved.items():
                layer._buffers[k] = v
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Fork the global RNG of the CPU (and of ``device`` if it is a GPU), seed it with ``seed``, restore it after.

    Only the generators in use are seeded: ``torch.manual_seed`` would also reseed every other GPU.
    """
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.default_generator.manual_seed(seed)
        if on_cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


__all__ = ["MODES", "default_batch_size", "leading_samples", "operator_mode", "seeded_rng"]
