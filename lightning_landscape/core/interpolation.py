"""Interpolate state dicts by key, and the BatchNorm statistics policy of an interpolated model.

``theta(alpha) = (1 - alpha) theta_A + alpha theta_B`` entry by entry, matched by *key* (never by position), for
floating-point tensors only; integer and bool buffers (``num_batches_tracked``, masks, indices) are copied from the
endpoint nearer to ``alpha`` and never blended. Interpolation runs in at least float32 whatever the stored dtype.

BatchNorm policies (Jordan et al. 2023, REPAIR; Frankle et al. 2020):

``"recompute"`` (default)
    reset the running statistics and re-estimate them as the cumulative average (``momentum=None``) over the given
    batches, in train mode with dropout off, at *every* alpha including the endpoints; afterwards each running mean is
    the mean of the per-batch means and each running variance the mean of the per-batch unbiased variances.
``"interpolate"``
    interpolate the running statistics like every other float buffer.
``"keep"``
    keep the statistics of the endpoint A for every alpha (for debugging only: it mis-normalises the interior).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.core._validation import check_choice
from lightning_landscape.core.modes import _norm_layers, default_batch_size, seeded_rng

BN_POLICIES = ("recompute", "interpolate", "keep")


def seeded_batches(batches: Iterable[Any], device: torch.device, seed: int | None) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` over the probe set, each step run with the global RNG forked and seeded ``seed + index``
    (restored afterwards; ``None`` leaves the RNG alone), so dropout masks are the same at every measurement."""
    for index, batch in enumerate(batches):
        if seed is None:
            yield index, batch
            continue
        with seeded_rng(device, seed + index):
            yield index, batch


def _size_of(batch: Any, batch_size_fn: Callable[[Any], int] | None) -> int:
    if batch_size_fn is None:
        return default_batch_size(batch)
    size = batch_size_fn(batch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TypeError(f"`batch_size_fn` must return an int >= 1 (the number of samples), got {size!r}.")
    return size


def _error_value(value: Any) -> Tensor:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return value.detach().double().reshape(())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"`error_fn` must return a number or a one-element Tensor (the batch's error rate), got {value!r}.")


def probe_set_totals(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    seed: int | None = 0,
    batch_size_fn: Callable[[Any], int] | None = None,
    error_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Tensor:
    """``[sum of size * loss, sum of size * error, sum of sizes]`` over ``batches`` (float64, on the module's
    device, without gradients; the error sum is 0 without ``error_fn``). Sums, not means, so that callers can add
    them over ranks before dividing. Runs in the module's current mode: wrap in ``operator_mode`` for another.

    Raises:
        TypeError: ``batch_size_fn`` or ``error_fn`` returned something else than documented (the message names
            the argument).
    """
    device = next(iter(module.parameters())).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for _, batch in seeded_batches(batches, device, seed):
            size = _size_of(batch, batch_size_fn)
            totals[0] += loss_fn(module, batch).detach().double().reshape(()) * size
            totals[2] += size
        if error_fn is not None:
            # same seeds: the error is measured on the same dropout masks as the loss
            for _, batch in seeded_batches(batches, device, seed):
                totals[1] += _error_value(error_fn(module, batch)).to(device) * _size_of(batch, batch_size_fn)
    return totals


def check_compatible(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the offending keys when two state dicts cannot be interpolated."""
    missing, extra = sorted(set(state_a) - set(state_b)), sorted(set(state_b) - set(state_a))
    if missing or extra:
        raise ValueError(f"State dicts must have the same keys: only in A {missing[:5]}, only in B {extra[:5]}.")
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape:
            raise ValueError(
                f"State dict entry {key!r} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
            )


def interpolate_state(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float, keys: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """``(1 - alpha) A + alpha B`` for floating-point entries (all, or only ``keys``; the others are A's), exact
    copies of A at ``alpha == 0`` and of B at ``alpha == 1``; non-float entries from the nearer endpoint."""
    check_compatible(state_a, state_b)
    selected = set(state_a) if keys is None else set(keys)
    out: dict[str, Tensor] = {}
    for key, a in state_a.items():
        b = state_b[key]
        if key not in selected:
            out[key] = a.clone()
        elif not a.is_floating_point():
            out[key] = (a if alpha < 0.5 else b).clone()
        elif alpha == 0.0:
            out[key] = a.clone()
        elif alpha == 1.0:
            out[key] = b.to(a.dtype).clone()
        else:
            work = torch.promote_types(a.dtype, torch.float32)
            mixed = torch.lerp(a.to(work), b.to(device=a.device, dtype=work), alpha)
            out[key] = mixed.to(a.dtype)
    return out


@contextlib.contextmanager
def loaded_state(module: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    """Load ``state`` into ``module`` for the duration, then restore its own parameters and buffers bitwise."""
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(state, strict=True)
        yield
    finally:
        module.load_state_dict(saved, strict=True)


def recompute_batchnorm(module: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> int:
    """Re-estimate every BatchNorm's running statistics over ``batches`` as a cumulative average.

    Runs ``forward(module, batch)`` in train mode with dropout off, no gradient; restores each layer's momentum,
    ``num_batches_tracked`` and every module's training flag afterwards. Returns the number of batches used (0: no
    BatchNorm, nothing done).
    """
    layers = _norm_layers(module)
    if not layers:
        return 0
    flags = {m: m.training for m in module.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    tracked = {layer: layer.num_batches_tracked.clone() for layer in layers if layer.num_batches_tracked is not None}
    used = 0
    try:
        module.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative moving average: the mean of the per-batch statistics
            layer.train()
        with torch.no_grad():
            for batch in batches:
                forward(module, batch)
                used += 1
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for layer, count in tracked.items():  # the estimate replaces the statistics, not the training history
            layer.num_batches_tracked.copy_(count)
        for m, flag in flags.items():
            m.training = flag
    return used


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` holds a normalisation layer with running statistics."""
    return bool(_norm_layers(module))


def batchnorm_buffer_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the running statistics of every BatchNorm-like layer."""
    keys = set()
    for name, m in module.named_modules():
        if m in _norm_layers(module):
            prefix = f"{name}." if name else ""
            keys |= {f"{prefix}running_mean", f"{prefix}running_var", f"{prefix}num_batches_tracked"}
    return keys


def check_bn_policy(policy: str) -> str:
    """Validate a BatchNorm policy name."""
    return check_choice("bn_policy", policy, BN_POLICIES)
