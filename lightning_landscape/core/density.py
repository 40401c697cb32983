"""Spectral density by stochastic Lanczos quadrature (SLQ).

Golub & Meurant, *Matrices, Moments and Quadrature with Applications* (2009); Lin, Saad & Yang, "Approximating
spectral densities of large matrices" (SIAM Review 2016); Ghorbani, Krishnan & Xiao, "An investigation into neural
net optimization via Hessian eigenvalue density" (ICML 2019); Papyan, "Traces of class/cross-class structure pervade
deep learning spectra" (JMLR 2020).

For a unit start vector ``v``, ``m`` Lanczos steps give ``T = S diag(theta) S^T`` and the Gauss quadrature rule
``v^T f(A) v ~ sum_i S[0, i]^2 f(theta_i)``, exact for polynomials of degree ``< 2m``. With ``v`` random
(Rademacher, normalised), ``E[v^T f(A) v] = tr(f(A)) / n``, so averaging the discrete measures
``sum_i w_i delta(x - theta_i)`` over runs estimates the eigenvalue density ``(1/n) sum_j delta(x - lambda_j)``.

Two bugs of PyHessian's implementation we avoid: ``T`` is diagonalised with the symmetric ``eigh`` (not the general
``eig``, whose eigenvectors are not orthonormal, so the weights did not sum to 1), and the weights are the squared
*first components* of its eigenvectors (not the whole eigenvector matrix squared, PyHessian#17/#23).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_landscape.core._krylov import _check_device, _check_generator, _check_operator, random_vector
from lightning_landscape.core._validation import check_float, check_int
from lightning_landscape.core.tridiagonal import lanczos_tridiagonal

# Grid points x quadrature nodes evaluated at once by SpectralDensity.density (bounds its temporary memory).
_DENSITY_CHUNK = 1 << 22


def _check_1d(name: str, value: Any, minimum: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a Tensor, got {type(value).__name__}.")
    if value.dim() != 1 or value.numel() < minimum:
        raise ValueError(f"`{name}` must be 1-D with at least {minimum} points, got shape {tuple(value.shape)}.")
    value = value.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` must be finite, got {value.tolist()[:8]}...")
    return value


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of each SLQ run: ``num_runs`` discrete measures of total mass 1.

    Attributes:
        nodes: (num_runs, m) float64 Ritz values of each run, ascending.
        weights: (num_runs, m) float64 quadrature weights, each row sums to 1 (squared first components of the
            eigenvectors of ``T``).
        num_matvecs: operator products used.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-broadened density on ``grid``, averaged over runs (Lin, Saad & Yang 2016, sec. 3).

        ``phi(x) = mean_runs sum_i w_i N(x; theta_i, sigma^2)`` integrates to 1 over a grid that covers the nodes by a
        few ``sigma``.

        Args:
            grid: 1-D points to evaluate at.
            sigma: kernel width, ``> 0``; default 1 % of the node range (at least ``1e-6 * max(1, max |node|)``).

        Returns:
            (len(grid),) float64 density values.

        Raises:
            TypeError: ``grid`` is not a Tensor or ``sigma`` not a number.
            ValueError: ``grid`` is not 1-D and finite, or ``sigma <= 0``.
        """
        grid = _check_1d("grid", grid, 1)
        if sigma is None:
            spread = float(self.nodes.max() - self.nodes.min())
            sigma = max(0.01 * spread, 1e-6 * max(1.0, float(self.nodes.abs().max())))
        sigma = check_float("sigma", sigma, minimum=0.0, strict_minimum=True)
        nodes = self.nodes.reshape(-1)
        weights = self.weights.reshape(-1) / self.nodes.shape[0]
        rows = max(1, _DENSITY_CHUNK // nodes.numel())
        out = [
            torch.exp(-0.5 * ((chunk[:, None] - nodes[None, :]) / sigma) ** 2) @ weights for chunk in grid.split(rows)
        ]
        return torch.cat(out) / (sigma * math.sqrt(2 * math.pi))

    def histogram(self, edges: Tensor) -> Tensor:
        """Probability mass per bin ``[edges[i], edges[i+1])`` (the last bin closed), averaged over runs.

        Mass at nodes outside ``[edges[0], edges[-1]]`` is dropped, so the bins sum to 1 only when they cover the
        spectrum.

        Args:
            edges: 1-D strictly increasing bin edges (at least two).

        Returns:
            (len(edges) - 1,) float64 masses.

        Raises:
            TypeError: ``edges`` is not a Tensor.
            ValueError: ``edges`` is not 1-D, finite and strictly increasing with at least two points.
        """
        edges = _check_1d("edges", edges, 2)
        if not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"`edges` must be strictly increasing, got {edges.tolist()[:8]}...")
        bins = edges.numel() - 1
        index = torch.bucketize(self.nodes, edges, right=True) - 1
        index = torch.where(self.nodes == edges[-1], torch.full_like(index, bins - 1), index)
        inside = (index >= 0) & (index < bins)
        mass = torch.zeros(bins, dtype=torch.float64)
        mass.index_add_(0, index[inside], self.weights[inside])
        return mass / self.nodes.shape[0]

    def moments(self, p: int) -> Tensor:
        """Per run ``sum_i w_i * node_i ** p``.

        Gauss quadrature with ``m`` nodes is exact for polynomials of degree ``< 2m``, so for ``p < 2m`` this is
        ``v^T A^p v / v^T v`` for the run's start vector ``v``; its mean over runs estimates ``tr(A^p) / n``.

        Raises:
            TypeError: ``p`` is not an int.
            ValueError: ``p < 0``.
        """
        check_int("p", p, minimum=0)
        return (self.weights * self.nodes**p).sum(-1)


def slq_density(
    op: Any,
    num_runs: int = 1,
    num_steps: int = 30,
    *,
    generator: torch.Generator | None = None,
    basis_device: torch.device | str | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with full reorthogonalisation and Rademacher start vectors.

    Run ``r`` starts from the ``r``-th Rademacher vector drawn from ``generator`` by
    :func:`~lightning_landscape.core.lanczos.random_vector` (restart vectors after a breakdown come from the same
    generator, after it), runs ``min(num_steps, n)`` Lanczos steps (:func:`~.lanczos.lanczos_tridiagonal`) and keeps
    the eigenvalues of ``T`` as nodes and the squared first components of its eigenvectors (``eigh``, float64) as
    weights. With ``num_steps >= n`` the nodes are the exact eigenvalues. The per-bin error of the averaged density
    is ``O(1 / sqrt(n * num_runs))`` for Rademacher starts (Ubaru, Chen & Saad 2017).

    Args:
        op: operator (``shape``, ``dtype``, ``device``, ``op @ v``) or a dense symmetric Tensor.
        num_runs: independent start vectors, ``>= 1``.
        num_steps: Lanczos steps per run, ``>= 1``; capped at ``n``.
        generator: CPU source of the start vectors (default: a fresh generator seeded with 0).
        basis_device: where each run's Krylov basis lives (default: the operator's device).

    Returns:
        SpectralDensity. Cost: ``num_runs * min(num_steps, n)`` products, and ``min(num_steps, n)`` basis vectors of
        memory (one run at a time).

    Raises:
        TypeError: ``num_runs``, ``num_steps``, ``generator`` or ``op`` has the wrong type.
        ValueError: ``num_runs`` or ``num_steps`` below 1, or an invalid ``op``, ``generator`` or ``basis_device``.
        FloatingPointError: the operator returned a non-finite product.
    """
    n = _check_operator(op)
    check_int("num_runs", num_runs, minimum=1)
    check_int("num_steps", num_steps, minimum=1)
    generator = _check_generator(generator)
    basis_device = _check_device("basis_device", basis_device, op.device)
    steps = min(num_steps, n)
    nodes, weights, matvecs = [], [], 0
    for _ in range(num_runs):
        start = random_vector(n, generator, "rademacher")
        alphas, betas, _basis, used = lanczos_tridiagonal(
            op, start, steps, basis_device=basis_device, generator=generator
        )
        del _basis  # release this run's basis before the next one allocates its own
        matvecs += used
        t = torch.diag(alphas)
        if betas.numel():
            t = t + torch.diag(betas, 1) + torch.diag(betas, -1)
        theta, s = torch.linalg.eigh(t)
        w = s[0, :] ** 2
        if theta.numel() < steps:
            # Only if the basis could not be extended (measure-zero); zero-weight copies keep the rows rectangular.
            theta = torch.cat([theta, theta[-1:].expand(steps - theta.numel())])
            w = torch.cat([w, w.new_zeros(steps - w.numel())])
        nodes.append(theta)
        weights.append(w)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), matvecs)


__all__ = ["SpectralDensity", "slq_density"]
