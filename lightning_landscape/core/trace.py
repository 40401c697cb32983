"""Stochastic trace estimators with a standard error: Hutchinson and Hutch++.

Both spend a fixed budget of operator products and report a standard error, never a "the running mean stopped
moving" rule: that rule (PyHessian's, LLA's) can stop after two samples by chance and says nothing about accuracy.
Probes are drawn one at a time in float64 on the CPU from the given generator (then cast and moved), so identically
seeded processes draw identical probes. Products are taken in blocks of at most ``block_size`` vectors through the
operator's ``matmat`` when it has one (:meth:`HessianOperator.matmat` batches them into one backward pass where that
pays), so the memory is ``block_size`` vectors plus, for Hutch++, the ``m/3`` sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_landscape.core._krylov import (
    _check_generator,
    _check_operator,
    _dot64,
    _matmat,
    _work_dtype,
    random_vector,
)
from lightning_landscape.core._validation import check_choice, check_int


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)``.
        stderr: its standard error (sample standard deviation of the random part over the square root of its sample
            count; ~0 where the estimate is exact, ``inf`` when a single random sample leaves it unknown).
        num_matvecs: operator products used.
        squared_frobenius: unbiased estimate of ``tr(A^2) = ||A||_F^2`` from the same products, or None.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    squared_frobenius: float | None = None


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.inf
    return float(samples.std(unbiased=True)) / math.sqrt(samples.numel())


def _finite(result: TraceResult) -> TraceResult:
    if not math.isfinite(result.estimate):
        # FloatingPointError is what the callbacks catch to log a failed measurement instead of crashing training.
        raise FloatingPointError(f"The trace estimate is not finite ({result.estimate}): a product was NaN or inf.")
    return result


#: Most probe vectors multiplied in one block (bounds the temporary memory of a batched product).
BLOCK_SIZE = 16


def _probe(op: Any, n: int, generator: torch.Generator, distribution: Literal["rademacher", "gaussian"]) -> Tensor:
    return random_vector(n, generator, distribution, dtype=_work_dtype(op.dtype)).to(device=op.device, dtype=op.dtype)


def _probes(op: Any, n: int, count: int, generator: torch.Generator, distribution: str) -> Tensor:
    """``count`` probes as the columns of an ``(n, count)`` block, drawn in order one at a time."""
    return torch.stack([_probe(op, n, generator, distribution) for _ in range(count)], dim=1)


def _blocks(total: int) -> list[int]:
    return [min(BLOCK_SIZE, total - start) for start in range(0, total, BLOCK_SIZE)]


def hutchinson_trace(
    op: Any,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
) -> TraceResult:
    """Hutchinson's estimator ``tr(A) ~ mean_i v_i^T A v_i`` (Hutchinson 1989; Avron & Toledo 2011).

    With Rademacher probes (``+-1`` entries, the default) the variance is ``2 (||A||_F^2 - sum_i A_ii^2)``, so the
    estimate is exact on a diagonal matrix; Gaussian probes have variance ``2 ||A||_F^2``. The same products give
    ``||A||_F^2 = tr(A^2) ~ mean_i ||A v_i||^2`` (unbiased for any probe with ``E[v v^T] = I``).

    Args:
        op: operator (``shape``, ``dtype``, ``device``, ``op @ v``) or a dense symmetric Tensor.
        num_matvecs: number of probes (= products), ``>= 2`` so that a standard error exists.
        generator: CPU source of the probes (default: a fresh generator seeded with 0).
        distribution: ``"rademacher"`` or ``"gaussian"``.

    Returns:
        TraceResult with ``stderr = std(samples) / sqrt(num_matvecs)``. Cost: ``num_matvecs`` products, in blocks;
        relative error ``~ sqrt(2) ||A||_F / (|tr A| sqrt(num_matvecs))``.

    Raises:
        TypeError: ``num_matvecs``, ``generator`` or ``op`` has the wrong type.
        ValueError: ``num_matvecs < 2``, an unknown ``distribution``, or an invalid ``op`` / ``generator``.
        FloatingPointError: the operator returned a non-finite product.
    """
    n = _check_operator(op)
    check_int("num_matvecs", num_matvecs, minimum=2)
    check_choice("distribution", distribution, ("rademacher", "gaussian"))
    generator = _check_generator(generator)
    quadratic, squares = [], []
    for size in _blocks(num_matvecs):
        probes = _probes(op, n, size, generator, distribution)
        products = _matmat(op, probes, n)
        for v, av in zip(probes.unbind(1), products.unbind(1), strict=True):
            quadratic.append(_dot64(v, av))
            squares.append(_dot64(av, av))
    # One host sync for all samples (the products stay on the operator's device until here).
    samples = torch.stack(quadratic).cpu()
    frobenius = float(torch.stack(squares).mean())
    return _finite(TraceResult(float(samples.mean()), _stderr(samples), num_matvecs, frobenius))


def hutchpp_trace(op: Any, num_matvecs: int = 30, *, generator: torch.Generator | None = None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace on a sketched subspace, Hutchinson on the rest.

    The budget ``m`` is split in thirds: ``A S`` for a random ``n x m/3`` Rademacher sketch ``S``, ``Q = orth(A S)``;
    ``tr(Q^T A Q)`` exactly (``m/3`` products); Hutchinson with the remaining ``m - 2 m/3`` Rademacher probes on
    the deflated ``(I - Q Q^T) A (I - Q Q^T)``. The relative error falls as ``1/m`` instead of Hutchinson's
    ``1/sqrt(m)`` when the spectrum decays (a few Hessian outliers carry most of the trace), and the estimate is
    exact when ``rank(A) <= m/3``. ``||A||_F^2 = ||A Q||_F^2 + E ||A (I - Q Q^T) g||^2`` comes from the same
    products.

    Args:
        op: operator or dense symmetric Tensor, ``(n, n)``.
        num_matvecs: product budget, ``>= 3``.
        generator: CPU source of the sketch and probes (default: a fresh generator seeded with 0).

    Returns:
        TraceResult whose ``stderr`` is that of the residual Hutchinson part (the sketched part is exact given the
        sketch); ``inf`` with a single residual probe. Cost: at most ``num_matvecs`` products (fewer only when the
        sketch already spans R^n, then the trace is exact), plus a QR of an ``n x m/3`` matrix and ``m/3`` vectors
        of memory on the operator's device.

    Raises:
        TypeError: ``num_matvecs``, ``generator`` or ``op`` has the wrong type.
        ValueError: ``num_matvecs < 3``, or an invalid ``op`` / ``generator``.
        FloatingPointError: the operator returned a non-finite product.
    """
    n = _check_operator(op)
    check_int("num_matvecs", num_matvecs, minimum=3)
    generator = _check_generator(generator)
    sketch_size = min(num_matvecs // 3, n)
    # QR has no half-precision kernels; orthogonality in float32 is ample for a sketch of a low-precision operator.
    work = op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32
    sketch = torch.cat(
        [_matmat(op, _probes(op, n, size, generator, "rademacher"), n) for size in _blocks(sketch_size)], dim=1
    )
    q, _ = torch.linalg.qr(sketch.to(work))
    del sketch
    low_rank, frobenius = [], []
    for columns in q.split(BLOCK_SIZE, dim=1):
        columns = columns.to(op.dtype)
        products = _matmat(op, columns, n)
        for column, aq in zip(columns.unbind(1), products.unbind(1), strict=True):
            low_rank.append(_dot64(column, aq))
            frobenius.append(_dot64(aq, aq))
    matvecs = sketch_size + q.shape[1]
    residual_probes = 0 if q.shape[1] >= n else num_matvecs - 2 * sketch_size
    quadratic, squares = [], []
    for size in _blocks(residual_probes):
        g = _probes(op, n, size, generator, "rademacher").to(work)
        g = (g - q @ (q.T @ g)).to(op.dtype)
        products = _matmat(op, g, n)
        for column, ag in zip(g.unbind(1), products.unbind(1), strict=True):
            quadratic.append(_dot64(column, ag))
            squares.append(_dot64(ag, ag))
    matvecs += residual_probes
    exact_part = float(torch.stack(low_rank).sum())
    exact_frobenius = float(torch.stack(frobenius).sum())
    if residual_probes == 0:
        return _finite(TraceResult(exact_part, 0.0, matvecs, exact_frobenius))
    samples = torch.stack(quadratic).cpu()
    return _finite(
        TraceResult(
            exact_part + float(samples.mean()),
            _stderr(samples),
            matvecs,
            exact_frobenius + float(torch.stack(squares).mean()),
        )
    )


__all__ = ["TraceResult", "hutchinson_trace", "hutchpp_trace"]
