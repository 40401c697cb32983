"""Fixed-step Lanczos (the recurrence SLQ needs) and deflated power iteration (PyHessian's method, a baseline)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_landscape.core._krylov import (
    _check_device,
    _check_generator,
    _check_operator,
    _dot64,
    _Krylov,
    _matvec,
    _work_dtype,
    random_vector,
)
from lightning_landscape.core._validation import check_float, check_int


class KrylovDecomposition(NamedTuple):
    """Outcome of :func:`lanczos_tridiagonal`: ``A Q^T ~ Q^T T`` with ``T = tridiag(betas, alphas, betas)``.

    Attributes:
        alphas: (m,) float64 diagonal of ``T``.
        betas: (m - 1,) float64 off-diagonal (0 where a breakdown forced a restart).
        basis: (m, n) orthonormal rows ``Q`` in the operator's dtype on ``basis_device``; row 0 is the unit start.
        num_matvecs: operator products used (``m``).
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor
    num_matvecs: int


def lanczos_tridiagonal(
    op: Any,
    start: Tensor,
    num_steps: int,
    *,
    basis_device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> KrylovDecomposition:
    """``num_steps`` Lanczos steps from ``start`` with full reorthogonalisation, no stopping rule.

    The recurrence :func:`lanczos` runs, exposed for stochastic Lanczos quadrature
    (:func:`~lightning_landscape.core.density.slq_density`): with ``T = S diag(theta) S^T``,
    ``sum_i S[0, i]^2 f(theta_i)`` is the Gauss quadrature of ``v^T f(A) v`` for the unit start vector ``v``
    (Golub & Meurant 2009). A breakdown restarts from a random vector (drawn from ``generator``) with ``beta = 0``,
    so ``T`` stays block-diagonal and the quadrature weights of the later blocks are exactly 0.

    Args:
        op: operator or dense symmetric Tensor, ``(n, n)``.
        start: (n,) non-zero start vector (normalised here).
        num_steps: Lanczos steps, ``>= 1``; capped at ``n``.
        basis_device: where the basis lives (default: the operator's device).
        generator: CPU source of restart vectors (default: seeded with 0).

    Returns:
        KrylovDecomposition. Cost: ``min(num_steps, n)`` operator products and that many basis vectors of memory.

    Raises:
        TypeError: ``num_steps``, ``start``, ``generator`` or ``op`` has the wrong type.
        ValueError: ``num_steps``, ``start``, ``basis_device``, ``generator`` or ``op`` is invalid.
        FloatingPointError: the operator returned a non-finite product.
    """
    n = _check_operator(op)
    check_int("num_steps", num_steps, minimum=1)
    if not isinstance(start, Tensor) or not start.is_floating_point():
        raise TypeError(f"`start` must be a floating-point Tensor, got {start!r}.")
    if start.shape != (n,):
        raise ValueError(f"`start` must have shape ({n},), got {tuple(start.shape)}.")
    start_norm = float(start.detach().double().norm())
    if not math.isfinite(start_norm) or start_norm == 0.0:
        raise ValueError(f"`start` must be finite and non-zero, got norm {start_norm}.")
    generator = _check_generator(generator)
    basis_device = _check_device("basis_device", basis_device, op.device)
    steps = min(num_steps, n)
    krylov = _Krylov(op, n, start, steps, basis_device, generator, grow=False)
    while krylov.size < steps:
        breakdown = krylov.step()
        if krylov.size >= steps:
            break
        if breakdown:
            if not krylov.restart():
                break
        else:
            krylov.extend()
    m = krylov.size
    return KrylovDecomposition(
        alphas=torch.tensor(krylov.alphas, dtype=torch.float64),
        betas=torch.tensor(krylov.betas[: m - 1], dtype=torch.float64),
        basis=krylov.basis[:m],
        num_matvecs=krylov.matvecs,
    )


class PowerIterationResult(NamedTuple):
    """Outcome of :func:`power_iteration` (unpacks as ``values, vectors, num_matvecs``).

    Attributes:
        eigenvalues: (k,) float64 Rayleigh quotients in the order found (largest magnitude first, ideally).
        eigenvectors: (k, n) unit vectors in the operator's dtype and device.
        num_matvecs: operator products used.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_matvecs: int


def power_iteration(
    op: Any, k: int = 1, *, tol: float = 1e-3, max_iter: int = 100, generator: torch.Generator | None = None
) -> PowerIterationResult:
    """Deflated power iteration as PyHessian does it (Yao et al. 2020): a benchmark baseline, not used by monitors.

    Each eigenvalue starts from a random vector and iterates ``v <- A v / ||A v||``, orthogonalising against the
    eigenvectors already found before every product (deflation by projection), until the Rayleigh quotient changes
    by less than ``tol`` relative (``|new - old| / (|old| + 1e-6)``, PyHessian's rule) or ``max_iter`` products
    are spent *per eigenvalue*. It converges to the largest-magnitude eigenvalue at the rate
    ``|lambda_2 / lambda_1|`` per product, and the relative-change rule stops early on slow convergence, which is
    why Lanczos beats it (see ``benchmarks/``).

    Args:
        op: operator or dense symmetric Tensor.
        k: number of eigenvalues, ``1 <= k <= n``.
        tol: relative-change tolerance, ``> 0``.
        max_iter: most products per eigenvalue, ``>= 1``.
        generator: CPU source of start vectors (default: seeded with 0).

    Returns:
        PowerIterationResult. Cost: up to ``k * max_iter`` products.

    Raises:
        TypeError: ``k``, ``tol``, ``max_iter``, ``generator`` or ``op`` has the wrong type.
        ValueError: ``k``, ``tol``, ``max_iter``, ``generator`` or ``op`` is invalid.
        FloatingPointError: the operator returned a non-finite product.
    """
    n = _check_operator(op)
    check_int("k", k, minimum=1)
    if k > n:
        raise ValueError(f"`k` must be <= the operator size {n}, got {k}.")
    tol = check_float("tol", tol, minimum=0.0, strict_minimum=True)
    check_int("max_iter", max_iter, minimum=1)
    generator = _check_generator(generator)
    values: list[float] = []
    vectors: list[Tensor] = []
    matvecs = 0

    def deflate(v: Tensor) -> Tensor:
        for u in vectors:
            v = v - (u @ v) * u
        return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)

    for _ in range(k):
        v = random_vector(n, generator, dtype=_work_dtype(op.dtype)).to(device=op.device, dtype=op.dtype)
        value, previous = math.nan, None
        for _ in range(max_iter):
            v = deflate(v)
            hv = _matvec(op, v, n)
            matvecs += 1
            value = float(_dot64(hv, v))
            if not math.isfinite(value):
                raise FloatingPointError(f"power_iteration: the Rayleigh quotient is not finite ({value}).")
            v = hv
            if previous is not None and abs(value - previous) / (abs(previous) + 1e-6) < tol:
                break
            previous = value
        vectors.append(deflate(v))
        values.append(value)
    return PowerIterationResult(torch.tensor(values, dtype=torch.float64), torch.stack(vectors), matvecs)


__all__ = ["KrylovDecomposition", "PowerIterationResult", "lanczos_tridiagonal", "power_iteration"]
