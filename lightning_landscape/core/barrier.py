"""Loss along the segment between two weight vectors, and the barriers read off it.

With ``f(alpha) = L((1 - alpha) theta_A + alpha theta_B)`` on one fixed evaluation set:

``chord`` (primary, Entezari et al. 2022)
    ``max_alpha f(alpha) - ((1 - alpha) f(0) + alpha f(1))``: >= 0, exactly 0 for any convex ``f``, unaffected by
    the gap between the endpoint losses (consecutive checkpoints of one run have very different losses).
``mean`` (Frankle et al. 2020; Git Re-Basin)
    ``max_alpha f(alpha) - (f(0) + f(1)) / 2``: at least half the endpoint gap even for a straight line; only
    meaningful between siblings with equal losses. Logged for comparison with the papers.
``midpoint`` (REPAIR)
    ``f(1/2) - (f(0) + f(1)) / 2``: one evaluation; can be negative.

The alpha grid is ``k / (n - 1)`` (exactly 0 and 1, no accumulated rounding), then refined by bisection steps
around the grid's best ``f - chord``. Cheap predictors of the midpoint barrier without evaluating the interior:
``-d^T H(mid) d / 8`` (exact for a quadratic) and the Hermite predictor ``(grad f(0) - grad f(1)) . d / 8`` (exact
for a cubic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from lightning_landscape.core._validation import check_int


@dataclass(frozen=True)
class BarrierResult:
    """An interpolation curve and its barriers.

    Attributes:
        alphas: evaluated alphas, ascending (grid plus refinement).
        losses: ``f(alpha)`` at those alphas.
        chord: the chord barrier (primary).
        chord_alpha: where it is attained.
        mean: the mean barrier (Frankle / Git Re-Basin).
        midpoint: the midpoint barrier (REPAIR); NaN if 1/2 was not evaluated.
        num_evaluations: loss evaluations spent.
    """

    alphas: list[float]
    losses: list[float]
    chord: float
    chord_alpha: float
    mean: float
    midpoint: float
    num_evaluations: int


def alpha_grid(num_alphas: int) -> list[float]:
    """``num_alphas`` points ``k / (n - 1)``: exactly 0 and 1 at the ends."""
    check_int("num_alphas", num_alphas, minimum=2)
    return [k / (num_alphas - 1) for k in range(num_alphas)]


def barriers_from_curve(alphas: list[float], losses: list[float]) -> tuple[float, float, float, float]:
    """``(chord, chord_alpha, mean, midpoint)`` of a curve that contains alpha = 0 and alpha = 1."""
    curve = dict(zip(alphas, losses, strict=True))
    if 0.0 not in curve or 1.0 not in curve:
        raise ValueError("`alphas` must contain exactly 0.0 and 1.0 (the endpoints).")
    if not all(math.isfinite(f) for f in losses):
        return math.nan, math.nan, math.nan, math.nan  # a non-finite loss on the curve: no barrier to speak of
    f0, f1 = curve[0.0], curve[1.0]
    excess = {a: f - ((1 - a) * f0 + a * f1) for a, f in curve.items()}
    chord_alpha = max(excess, key=lambda a: excess[a])
    chord = max(0.0, excess[chord_alpha])
    mean = max(curve.values()) - 0.5 * (f0 + f1)
    midpoint = curve[0.5] - 0.5 * (f0 + f1) if 0.5 in curve else math.nan
    return chord, chord_alpha, mean, midpoint


def interpolation_barrier(
    loss_at: Callable[[float], float], num_alphas: int = 11, refine_steps: int = 3
) -> BarrierResult:
    """Evaluate ``loss_at`` on the grid, refine around the peak of ``f - chord``, and compute the barriers.

    Cost: ``num_alphas + refine_steps`` evaluations of ``loss_at``.
    """
    check_int("refine_steps", refine_steps, minimum=0)
    curve = {a: float(loss_at(a)) for a in alpha_grid(num_alphas)}

    def excess(a: float) -> float:
        return curve[a] - ((1 - a) * curve[0.0] + a * curve[1.0])

    step = 1.0 / (num_alphas - 1)
    best = max(curve, key=excess)
    lo, hi = max(0.0, best - step), min(1.0, best + step)
    for _ in range(refine_steps):
        # bisect the wider side of the bracket around the current best point
        candidate = (lo + best) / 2 if best - lo >= hi - best else (best + hi) / 2
        if candidate in curve:
            break
        curve[candidate] = float(loss_at(candidate))
        if excess(candidate) > excess(best):
            lo, hi = (lo, best) if candidate < best else (best, hi)
            best = candidate
        elif candidate < best:
            lo = candidate
        else:
            hi = candidate
    alphas = sorted(curve)
    losses = [curve[a] for a in alphas]
    chord, chord_alpha, mean, midpoint = barriers_from_curve(alphas, losses)
    return BarrierResult(alphas, losses, chord, chord_alpha, mean, midpoint, len(curve))


def hessian_midpoint_predictor(direction: Tensor, hessian_times_direction: Tensor) -> float:
    """``-d^T H d / 8`` with ``H`` the Hessian at the midpoint: the exact midpoint barrier of a quadratic."""
    return -float(direction.double() @ hessian_times_direction.double()) / 8.0


def hermite_midpoint_predictor(direction: Tensor, gradient_a: Tensor, gradient_b: Tensor) -> float:
    """``(grad L(A) - grad L(B)) . d / 8``: the midpoint barrier of the cubic Hermite interpolant of the endpoints
    (exact for a cubic loss along the segment)."""
    return float((gradient_a.double() - gradient_b.double()) @ direction.double()) / 8.0
