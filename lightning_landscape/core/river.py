"""River vs mountain: the share of an optimizer update that lies in the span of the top Hessian eigenvectors.

Wen et al., "Understanding Warmup-Stable-Decay Learning Rates: A River Valley Loss Landscape Perspective" (arXiv
2410.05192): at a high learning rate the iterate oscillates across the steep ("mountain") directions while it makes
progress along the flat ("river") one; decaying the learning rate removes the oscillation. The share of the squared
norm of an update ``d`` that lies in the span of the top eigenvectors ``V`` of the Hessian,

    ``f = ||P_V d||^2 / ||d||^2``,  ``P_V`` the orthogonal projector onto ``span(V)``,

is high while the update is dominated by the oscillation across the top directions and falls when it is not.

The rows of ``V`` come from Lanczos (unit Ritz vectors, orthogonal to working precision with full
reorthogonalisation, but not exactly, in float32 and for pairs that did not converge), so the projector is built
from the Gram matrix ``G = V V^T`` in float64: ``||P_V d||^2 = c^T G^+ c`` with ``c = V d``, the pseudo-inverse
dropping directions of ``G`` below ``1e-10`` of its largest eigenvalue (a duplicated vector then counts once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Eigenvalues of the Gram matrix below this fraction of its largest are treated as zero (linearly dependent rows).
_RANK_TOL = 1e-10


def _check_vectors(vectors: Tensor) -> Tensor:
    if not isinstance(vectors, Tensor):
        raise TypeError(f"`vectors` must be a Tensor of shape (k, n), got {type(vectors).__name__}.")
    if vectors.dim() != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"`vectors` must have shape (k, n) with k, n >= 1, got {tuple(vectors.shape)}.")
    return vectors


def projected_fraction(coefficients: Tensor, gram: Tensor, squared_norm: float) -> float:
    """``c^T G^+ c / ||d||^2`` clipped to ``[0, 1]``: the share of ``||d||^2`` in the span of the rows of ``V``,
    from ``c = V d`` and ``G = V V^T`` (float64). ``nan`` when ``d = 0`` (no update: nothing to split) or when
    ``d`` or ``c`` is not finite (never a clipped 0 or 1 standing in for a diverged step)."""
    if not math.isfinite(squared_norm) or squared_norm <= 0.0 or not bool(torch.isfinite(coefficients).all()):
        return math.nan
    values, basis = torch.linalg.eigh(gram.double().cpu())
    keep = values > _RANK_TOL * max(float(values.max()), 0.0)
    if not bool(keep.any()):
        return 0.0
    rotated = basis[:, keep].T @ coefficients.double().cpu()
    inside = float((rotated**2 / values[keep]).sum())
    return min(1.0, max(0.0, inside / squared_norm))


def span_fraction(vectors: Tensor, update: Tensor) -> float:
    """Share of ``||update||^2`` in the span of the rows of ``vectors`` (need not be orthonormal), in float64.

    Args:
        vectors: (k, n) directions (e.g. the top-k Hessian eigenvectors).
        update: (n,) the update (parameters after minus before).

    Returns:
        ``||P d||^2 / ||d||^2`` in ``[0, 1]``; ``nan`` for a zero update.

    Raises:
        TypeError: ``vectors`` or ``update`` is not a Tensor.
        ValueError: the shapes do not match ``(k, n)`` and ``(n,)``.
    """
    vectors = _check_vectors(vectors)
    if not isinstance(update, Tensor):
        raise TypeError(f"`update` must be a Tensor of shape (n,), got {type(update).__name__}.")
    if update.shape != (vectors.shape[1],):
        raise ValueError(
            f"`update` must have shape ({vectors.shape[1]},) to match `vectors` {tuple(vectors.shape)}, got "
            f"{tuple(update.shape)}."
        )
    v = vectors.detach().double().cpu()
    d = update.detach().double().cpu()
    return projected_fraction(v @ d, v @ v.T, float(d @ d))


class UpdateSnapshot:
    """The monitored parameters before an optimizer step, kept on the CPU, and the update's top-span share after it.

    Memory: one host copy of the parameters (their dtype) between the two calls; nothing stays on the accelerator.
    The update is formed per parameter in float64 (the difference of two float32 values is exact there), so no
    cancellation from ``||after||^2 - 2 after.before + ||before||^2``.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        if not params:
            raise ValueError("`params` must hold at least one parameter tensor, got an empty sequence.")
        self.shapes = [tuple(p.shape) for p in params]
        self.before = [p.detach().to("cpu", copy=True) for p in params]
        self.numel = sum(p.numel() for p in self.before)

    def fraction(self, params: Sequence[Tensor], vectors: Tensor, gram: Tensor | None = None) -> float:
        """Share of the squared norm of ``params - before`` in the span of the rows of ``vectors`` ((k, n), CPU).

        ``gram``: ``vectors @ vectors.T`` in float64 when the caller caches it (it only changes with the vectors).

        Raises:
            ValueError: ``params`` do not have the snapshot's shapes, or ``vectors`` not ``n`` columns.
        """
        vectors = _check_vectors(vectors)
        if [tuple(p.shape) for p in params] != self.shapes:
            raise ValueError("`params` must have the shapes of the snapshot (the parameter selection changed).")
        if vectors.shape[1] != self.numel:
            raise ValueError(
                f"`vectors` must have {self.numel} columns (one per parameter entry), got {vectors.shape}."
            )
        coefficients = torch.zeros(vectors.shape[0], dtype=torch.float64)
        squared = torch.zeros((), dtype=torch.float64)
        offset = 0
        for p, before in zip(params, self.before, strict=True):
            d = p.detach().to("cpu", torch.float64).reshape(-1) - before.to(torch.float64).reshape(-1)
            coefficients += vectors[:, offset : offset + d.numel()].to(torch.float64) @ d
            squared += d @ d
            offset += d.numel()
        if gram is None:
            v = vectors.to(torch.float64)
            gram = v @ v.T
        return projected_fraction(coefficients, gram, float(squared))


__all__ = ["UpdateSnapshot", "projected_fraction", "span_fraction"]
