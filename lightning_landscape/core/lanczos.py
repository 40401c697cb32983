"""Lanczos for the extreme eigenpairs of a symmetric operator: full reorthogonalisation, warm starts, residual stop.

Why our own and not ARPACK (``scipy.sparse.linalg.eigsh``): ARPACK needs at least ~20 products even from the exact
eigenvector (scipy#9470), copies every vector to host NumPy, and cannot be warm-started cheaply. Why not
hessian-eigenthings' default: it stops after ``2k`` steps (two products for the sharpness) whether or not the Ritz
pairs converged. Here the iteration goes on until every requested pair's residual ``|beta_m s_{m,i}|`` is below
``tol * |theta_1|`` or ``max_iter`` products are spent, and the result says which (``converged``).

Numerics: every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt, "twice is
enough"), so no ghost eigenvalues appear; the tridiagonal matrix is built and diagonalised in float64. On a
breakdown (an invariant subspace) the iteration restarts from a random vector orthogonal to the basis, which is how
a repeated eigenvalue is found. Memory: ``(max_iter + 1) x n`` for the basis, on ``basis_device`` (``"cpu"`` keeps
it off the accelerator).

Random vectors are drawn in float64 on the CPU from the given generator and only then moved, so processes with
identically seeded generators draw bitwise identical vectors whatever their device (needed under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_float, check_int

# Relative size of beta below which the Krylov space is treated as invariant.
_BREAKDOWN = 1e-12


@dataclass(frozen=True)
class LanczosResult:
    """Outcome of :func:`lanczos`.

    Attributes:
        eigenvalues: (k,) float64, the top-k Ritz values, descending.
        eigenvectors: (k, n) unit Ritz vectors in the operator's dtype and device, row i for ``eigenvalues[i]``.
        residuals: (k,) float64 residual norms ``||A y - theta y||`` (as ``|beta_m s_{m,i}|``).
        lambda_min: the smallest Ritz value when ``smallest=True``.
        lambda_min_vector: its Ritz vector.
        lambda_min_residual: its residual norm.
        converged: every requested pair met ``residual <= tol * |theta_1|`` (or the space is all of R^n).
        num_matvecs: operator products used.
        alphas: float64 diagonal of the tridiagonal matrix.
        betas: float64 off-diagonal (0 where the iteration restarted).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    lambda_min: float | None
    lambda_min_vector: Tensor | None
    lambda_min_residual: float | None
    converged: bool
    num_matvecs: int
    alphas: Tensor
    betas: Tensor


def _check_operator(op: Any) -> int:
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`op` must be a square operator with .shape (n, n), got shape {shape}.")
    return int(shape[0])


def _random_unit(n: int, generator: torch.Generator) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    return v / v.norm()


class _Krylov:
    """The Lanczos recurrence with full reorthogonalisation (shared by :func:`lanczos` and SLQ)."""

    def __init__(self, op: Any, start: Tensor, capacity: int, basis_device: Any, generator: torch.Generator) -> None:
        self.op = op
        self.n = op.shape[0]
        self.dtype, self.device = op.dtype, op.device
        self.basis_device = torch.device(basis_device) if basis_device is not None else torch.device(op.device)
        self.generator = generator
        self.basis = torch.zeros(capacity, self.n, dtype=self.dtype, device=self.basis_device)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # beta_j couples q_j and q_{j+1}
        self.last_beta = 0.0
        self.scale = 0.0
        self.matvecs = 0
        start = start.to(device=self.device, dtype=torch.float64)
        self.q = (start / start.norm()).to(self.dtype)

    @property
    def size(self) -> int:
        return len(self.alphas)

    def _orthogonalise(self, w: Tensor, count: int) -> Tensor:
        for _ in range(2):
            block = self.basis[:count]
            w = w - ((block @ w.to(self.basis_device)) @ block).to(self.device)
        return w

    def step(self) -> bool:
        """One product and one basis vector; returns True on a breakdown (invariant subspace)."""
        j = self.size
        self.basis[j] = self.q.to(self.basis_device)
        w = self.op @ self.q
        self.matvecs += 1
        self.alphas.append(float(torch.dot(w.double(), self.q.double())))
        w = self._orthogonalise(w, j + 1)
        beta = float(w.double().norm())
        self.scale = max(self.scale, abs(self.alphas[-1]), beta)
        self.last_beta = beta
        if beta > _BREAKDOWN * max(self.scale, 1e-300):
            self.q = w / beta
            return False
        self.last_beta = 0.0
        return True

    def advance(self, breakdown: bool) -> bool:
        """Prepare the next vector after :meth:`step`; False when the whole space is exhausted."""
        if self.size >= self.n:
            return False
        if not breakdown:
            self.betas.append(self.last_beta)
            return True
        for _ in range(3):  # a random vector is almost surely not in the span; retry against bad luck
            w = self._orthogonalise(_random_unit(self.n, self.generator).to(self.device, self.dtype), self.size)
            norm = float(w.double().norm())
            if norm > 1e-8:
                self.betas.append(0.0)
                self.q = w / norm
                return True
        return False

    def tridiagonal(self) -> Tensor:
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if self.size > 1:
            off = torch.tensor(self.betas[: self.size - 1], dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of T, and residual norms ``|beta_m s_{m,i}|``."""
        theta, s = torch.linalg.eigh(self.tridiagonal())
        return theta, s, (self.last_beta * s[-1, :]).abs()

    def vectors(self, s_columns: Tensor) -> Tensor:
        m = self.size
        out = (s_columns.T.to(dtype=self.dtype, device=self.basis_device) @ self.basis[:m]).to(self.device)
        return out / out.norm(dim=1, keepdim=True)


def _start_vector(n: int, init: Tensor | None, generator: torch.Generator) -> Tensor:
    noise = _random_unit(n, generator)
    if init is None:
        return noise
    rows = init.detach().reshape(-1, n).to(device="cpu", dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # Random positive weights avoid an unlucky cancellation; the small random part lets a direction that has
    # become sharp since the last measurement enter the Krylov space.
    weights = 1.0 + torch.rand(rows.shape[0], generator=generator, dtype=torch.float64)
    start = (weights[:, None] * rows).sum(0)
    return start / start.norm() + 1e-3 * noise


def _converged(theta: Tensor, residuals: Tensor, k: int, smallest: bool, tol: float) -> bool:
    if theta.numel() < k:
        return False
    limit = tol * max(float(theta.abs().max()), 1e-300)
    done = bool((residuals[-k:] <= limit).all())
    return done and (not smallest or bool(residuals[0] <= limit))


def lanczos(
    op: Any,
    k: int = 1,
    *,
    smallest: bool = False,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> LanczosResult:
    """Top-``k`` eigenpairs (and optionally the smallest) of a symmetric operator.

    Args:
        op: operator (``shape``, ``dtype``, ``device``, ``op @ v``) or a dense symmetric Tensor.
        k: number of largest eigenvalues.
        smallest: also converge the smallest (most negative) eigenvalue.
        tol: stop when every requested residual is ``<= tol * |theta_1|``.
        max_iter: most products to spend.
        init: warm start, ``(n,)`` or ``(j, n)``, e.g. the previous measurement's eigenvectors.
        generator: source of random vectors (default: seeded with 0).
        basis_device: where the Krylov basis lives (default: the operator's device).

    Returns:
        LanczosResult. Cost: ``num_matvecs`` products, typically ``k + a few`` warm and 10-40 cold.

    Raises:
        ValueError: ``k``, ``max_iter``, ``tol``, ``init`` or ``op`` is invalid.

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> r = lanczos(a, k=1, smallest=True, tol=1e-10)
        >>> round(float(r.eigenvalues[0]), 6), round(r.lambda_min, 6), r.converged
        (3.0, -2.0, True)
    """
    n = _check_operator(op)
    check_int("k", k, minimum=1)
    if k > n:
        raise ValueError(f"`k` must be <= the operator size {n}, got {k}.")
    check_int("max_iter", max_iter, minimum=k)
    tol = check_float("tol", tol, minimum=0.0, strict_minimum=True)
    if init is not None and (init.dim() not in (1, 2) or init.shape[-1] != n):
        raise ValueError(f"`init` must have shape ({n},) or (j, {n}), got {tuple(init.shape)}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(max_iter, n)
    krylov = _Krylov(op, _start_vector(n, init, generator), steps, basis_device, generator)
    while True:
        breakdown = krylov.step()
        theta, s, residuals = krylov.ritz()
        # After a breakdown the Ritz values are exact for the invariant subspace, but a repeated eigenvalue (or one
        # the start vector missed) only appears after the restart, so convergence is not declared there.
        done = krylov.size >= steps or (
            krylov.size >= k and not breakdown and _converged(theta, residuals, k, smallest, tol)
        )
        if done or not krylov.advance(breakdown):
            break
    m = krylov.size
    kk = min(k, m)
    top = torch.arange(m - 1, m - 1 - kk, -1)
    exhausted = m >= n
    if exhausted:
        residuals = torch.zeros_like(residuals)
    return LanczosResult(
        eigenvalues=theta[top].clone(),
        eigenvectors=krylov.vectors(s[:, top]),
        residuals=residuals[top].clone(),
        lambda_min=float(theta[0]) if smallest else None,
        lambda_min_vector=krylov.vectors(s[:, :1])[0] if smallest else None,
        lambda_min_residual=float(residuals[0]) if smallest else None,
        converged=exhausted or (m >= k and _converged(theta, residuals, k, smallest, tol)),
        num_matvecs=krylov.matvecs,
        alphas=torch.tensor(krylov.alphas, dtype=torch.float64),
        betas=torch.tensor(krylov.betas[: m - 1], dtype=torch.float64),
    )


def lanczos_tridiagonal(
    op: Any,
    start: Tensor,
    num_steps: int,
    *,
    basis_device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, int]:
    """``num_steps`` Lanczos steps from ``start`` (capped at n): float64 ``(alphas, betas, num_matvecs)``.

    The quadrature rule of stochastic Lanczos quadrature; restarts on breakdown keep ``T`` block-diagonal.
    """
    n = _check_operator(op)
    check_int("num_steps", num_steps, minimum=1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(num_steps, n)
    krylov = _Krylov(op, start, steps, basis_device, generator)
    while True:
        breakdown = krylov.step()
        if krylov.size >= steps or not krylov.advance(breakdown):
            break
    m = krylov.size
    return (
        torch.tensor(krylov.alphas, dtype=torch.float64),
        torch.tensor(krylov.betas[: m - 1], dtype=torch.float64),
        krylov.matvecs,
    )


def power_iteration(
    op: Any, k: int = 1, *, tol: float = 1e-3, max_iter: int = 100, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, int]:
    """Deflated power iteration as PyHessian does it (a baseline for benchmarks, not used by the monitors).

    Each eigenvalue: Rayleigh quotient iterations from a random vector, orthogonalised against the eigenvectors
    already found, stopped when the relative change is below ``tol`` or after ``max_iter`` products. Returns the
    eigenvalues (in the order found: largest magnitude first), the vectors, and the number of products.
    """
    n = _check_operator(op)
    check_int("k", k, minimum=1)
    check_int("max_iter", max_iter, minimum=1)
    check_float("tol", tol, minimum=0.0, strict_minimum=True)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    values: list[float] = []
    vectors: list[Tensor] = []
    matvecs = 0
    for _ in range(k):
        v = _random_unit(n, generator).to(op.device, op.dtype)
        value = None
        for _ in range(max_iter):
            for u in vectors:
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            hv = op @ v
            matvecs += 1
            new = float(torch.dot(hv.double(), v.double()))
            v = hv
            if value is not None and abs(new - value) / (abs(value) + 1e-6) < tol:
                value = new
                break
            value = new
        for u in vectors:
            v = v - torch.dot(u, v) * u
        vectors.append(v / v.norm())
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64), torch.stack(vectors), matvecs
