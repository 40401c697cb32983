"""Loss surfaces along Hessian axes, and the HESD spectrum-shape criteria of the Loss Landscape Analysis library.

Gabdullin, "Investigating generalization capabilities of neural networks by means of loss landscapes and Hessian
analysis" (arXiv 2412.10146; library LLA, GabdullinN/loss-landscape-analysis): random-direction plots with
filter normalisation (Li et al. 2018) can misrepresent networks with BatchNorm, while the plane spanned by the top
two Hessian eigenvectors does not depend on a random draw or on a normalisation. :func:`hessian_plane` evaluates a
loss on the grid ``theta + a v1 + b v2``; :func:`hesd_criteria` computes the paper's two numbers from the nodes and
weights of stochastic Lanczos quadrature.

The parameters are moved in place and restored bitwise (from a copy taken before the first move); the loss function
is the caller's (the callback recomputes BatchNorm statistics at each point there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_float, check_int


@dataclass(frozen=True)
class Surface:
    """Losses on a square grid around ``theta``.

    Attributes:
        alphas: (g,) float64 offsets along ``v1`` (parameter-space distance: the directions are unit vectors).
        betas: (g,) float64 offsets along ``v2``.
        losses: (g, g) float64, ``losses[i, j]`` at ``theta + alphas[i] v1 + betas[j] v2``.
        num_evaluations: calls of the loss function.
    """

    alphas: Tensor
    betas: Tensor
    losses: Tensor
    num_evaluations: int

    @property
    def centre(self) -> float:
        """The loss at ``theta`` (the grid's middle point, evaluated with the parameters untouched)."""
        g = self.alphas.numel() // 2
        return float(self.losses[g, g])

    def slice_v1(self) -> Tensor:
        """(g,) the losses along ``v1`` through ``theta`` (``b = 0``)."""
        return self.losses[:, self.betas.numel() // 2].clone()

    def curvature(self, axis: int = 0) -> float:
        """Second difference at the centre along ``v1`` (``axis=0``) or ``v2`` (``axis=1``) over the grid spacing
        squared: ``(L(h) - 2 L(0) + L(-h)) / h^2``, exactly ``v^T H v`` (the eigenvalue) for a quadratic loss."""
        g = self.alphas.numel() // 2
        offsets = self.alphas if axis == 0 else self.betas
        h = float(offsets[g + 1] - offsets[g])
        line = self.losses[:, g] if axis == 0 else self.losses[g, :]
        return float((line[g + 1] - 2 * line[g] + line[g - 1]) / h**2)


def _unit_rows(directions: Tensor, n: int) -> Tensor:
    if not isinstance(directions, Tensor):
        raise TypeError(f"`directions` must be a Tensor of shape (2, n), got {type(directions).__name__}.")
    if directions.shape != (2, n):
        raise ValueError(
            f"`directions` must have shape (2, {n}) (two directions over the parameters), got "
            f"{tuple(directions.shape)}."
        )
    d = directions.detach().to(torch.float64)
    norms = d.norm(dim=1)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(d).all()):
        raise ValueError("`directions` must be finite and non-zero.")
    return d / norms[:, None]


def hessian_plane(
    params: Mapping[str, Tensor],
    directions: Tensor,
    loss_at: Callable[[], float],
    radius: float,
    grid: int = 9,
) -> Surface:
    """Evaluate ``loss_at()`` with ``params`` set to ``theta + a v1 + b v2`` on a ``grid x grid`` square.

    ``a, b`` run over ``radius * linspace(-1, 1, grid)``; the rows of ``directions`` are normalised to unit length
    (float64), so ``radius`` is a distance in parameter space. Each point's parameters are formed from the saved
    ``theta`` (never accumulated), in float64 then cast to the parameters' dtype; the centre is evaluated with the
    parameters exactly ``theta``. Afterwards every parameter is bitwise what it was, also when ``loss_at`` raises.

    Memory: one copy of ``params`` and the two directions, on the parameters' device. Cost: ``grid**2`` calls.

    Args:
        params: the parameters spanned by ``directions`` (in order; flattened and concatenated, ``n`` entries).
        directions: (2, n) ``v1, v2`` (e.g. the top two Hessian eigenvectors).
        loss_at: evaluates the loss of the model in its current state.
        radius: half-width of the square, ``> 0``.
        grid: points per axis, odd (the centre is on the grid), ``>= 3``.

    Raises:
        TypeError / ValueError: an argument has the wrong type, shape or value.
    """
    radius = check_float("radius", radius, minimum=0.0, strict_minimum=True)
    grid = check_int("grid", grid, minimum=3)
    if grid % 2 == 0:
        raise ValueError(f"`grid` must be odd (so that theta itself is a grid point), got {grid}.")
    tensors = list(params.values())
    if not tensors:
        raise ValueError("`params` must hold at least one parameter.")
    n = sum(t.numel() for t in tensors)
    unit = _unit_rows(directions, n)
    offsets = torch.linspace(-radius, radius, grid, dtype=torch.float64)
    offsets[grid // 2] = 0.0
    saved = [t.detach().clone() for t in tensors]
    pieces: list[tuple[Tensor, Tensor]] = []
    offset = 0
    for t in tensors:
        m = t.numel()
        pieces.append(
            tuple(unit[i, offset : offset + m].reshape(t.shape).to(t.device) for i in range(2))  # type: ignore[misc]
        )
        offset += m
    losses = torch.empty(grid, grid, dtype=torch.float64)
    try:
        for i, a in enumerate(offsets.tolist()):
            for j, b in enumerate(offsets.tolist()):
                with torch.no_grad():
                    for t, theta, (v1, v2) in zip(tensors, saved, pieces, strict=True):
                        if a == 0.0 and b == 0.0:
                            t.copy_(theta)
                        else:
                            t.copy_(theta.to(torch.float64) + a * v1 + b * v2)
                losses[i, j] = float(loss_at())
    finally:
        with torch.no_grad():
            for t, theta in zip(tensors, saved, strict=True):
                t.copy_(theta)
    return Surface(offsets, offsets.clone(), losses, grid * grid)


def hesd_criteria(nodes: Tensor, weights: Tensor, power: float = 0.5) -> tuple[float, float]:
    """The HESD criteria ``re`` and ``Kh_n`` of Gabdullin (arXiv 2412.10146), as the LLA library defines them.

    Per SLQ run (one row of ``nodes`` and ``weights``): ``re = |lambda_min / lambda_max|`` over the run's nodes, and
    ``Kh_n = |sum over negative nodes of |lambda w|^n| / sum over positive nodes of (lambda w)^n``; both are
    averaged over runs (LLA's ``hessian_criteria``, ``n = 0.5`` by default). Nodes exactly 0 count in neither sum.
    A run without a positive node gives ``inf`` for ``Kh_n`` (and ``re`` when ``lambda_max = 0``).

    Args:
        nodes: (runs, m) or (m,) quadrature nodes (Ritz values).
        weights: the matching quadrature weights.
        power: ``n``, ``> 0``.

    Returns:
        ``(re, Kh_n)``.

    Raises:
        TypeError / ValueError: the tensors do not match or ``power <= 0``.
    """
    power = check_float("power", power, minimum=0.0, strict_minimum=True)
    if not isinstance(nodes, Tensor) or not isinstance(weights, Tensor):
        raise TypeError("`nodes` and `weights` must be Tensors.")
    if nodes.shape != weights.shape or nodes.dim() not in (1, 2) or nodes.numel() == 0:
        raise ValueError(
            f"`nodes` and `weights` must have the same (runs, m) or (m,) shape, got {tuple(nodes.shape)} and "
            f"{tuple(weights.shape)}."
        )
    lam = nodes.detach().double().cpu().reshape(-1, nodes.shape[-1])
    w = weights.detach().double().cpu().reshape(lam.shape)
    res, khs = [], []
    for row, wrow in zip(lam, w, strict=True):
        top, bottom = float(row.max()), float(row.min())
        res.append(abs(bottom / top) if top != 0 else math.inf)
        products = row * wrow
        positive = float((products[row > 0] ** power).sum())
        negative = float((products[row < 0].abs() ** power).sum())
        khs.append(abs(negative / positive) if positive > 0 else math.inf)
    return sum(res) / len(res), sum(khs) / len(khs)


__all__ = ["Surface", "hesd_criteria", "hessian_plane"]
