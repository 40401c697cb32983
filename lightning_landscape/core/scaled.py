"""The diagonally scaled Hessian ``D H D + diag(shift)``: what a diagonally preconditioned optimizer's stability
depends on (Cohen et al. 2022; :mod:`~lightning_landscape.core.stability`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class DiagonalScaledOperator:
    """``D H D + diag(shift)`` for a diagonal ``D = diag(scale)``: the symmetric form of a diagonally preconditioned
    Hessian, plus the diagonal that coupled weight decay adds (``W D^2``, :func:`~.stability.stability_shift`).

    With ``scale = P ** -0.5`` this is ``P^-1/2 H P^-1/2``, similar to ``P^-1 H`` (same eigenvalues) but symmetric,
    so Lanczos applies (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability").

    Raises:
        ValueError: ``scale`` or ``shift`` is not 1-D with ``n`` elements.
    """

    def __init__(self, operator: Any, scale: Tensor, shift: Tensor | None = None) -> None:
        n = operator.shape[0]
        for name, value in (("scale", scale), ("shift", shift)):
            if value is not None and (value.dim() != 1 or value.numel() != n):
                raise ValueError(f"`{name}` must be 1-D with {n} elements, got shape {tuple(value.shape)}.")
        self.operator = operator
        self.scale = scale.to(device=operator.device, dtype=operator.dtype)
        self.shift = None if shift is None else shift.to(device=operator.device, dtype=operator.dtype)
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device

    def __matmul__(self, vector: Tensor) -> Tensor:
        vector = vector.to(self.device, self.dtype)
        out = self.scale * (self.operator @ (self.scale * vector))
        return out if self.shift is None else out.add_(self.shift * vector)


__all__ = ["DiagonalScaledOperator"]
