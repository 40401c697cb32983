"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant 2009; Ghorbani, Krishnan & Xiao 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_int
from lightning_landscape.core.lanczos import lanczos_tridiagonal


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of each SLQ run.

    Attributes:
        nodes: (runs, m) float64 Ritz values.
        weights: (runs, m) float64, each row sums to 1 (squared first components of T's eigenvectors).
        num_matvecs: operator products used.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-broadened density on ``grid``, averaged over runs; integrates to ~1 on a covering grid.

        ``sigma`` defaults to 1 % of the spectral range (at least 1e-6).
        """
        grid = grid.double()
        if sigma is None:
            sigma = max(1e-6, 0.01 * float(self.nodes.max() - self.nodes.min()))
        kernel = torch.exp(-0.5 * ((grid[:, None, None] - self.nodes[None]) / sigma) ** 2) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return (kernel * self.weights[None]).sum(-1).mean(-1)

    def histogram(self, edges: Tensor) -> Tensor:
        """Probability mass per bin ``[edges[i], edges[i+1])`` (last bin closed), averaged over runs."""
        edges = edges.double()
        index = torch.bucketize(self.nodes, edges, right=True) - 1
        index = torch.where(self.nodes == edges[-1], torch.full_like(index, len(edges) - 2), index)
        mass = torch.zeros(len(edges) - 1, dtype=torch.float64)
        inside = (index >= 0) & (index < len(edges) - 1)
        mass.index_add_(0, index[inside], self.weights[inside])
        return mass / self.nodes.shape[0]

    def moments(self, p: int) -> Tensor:
        """Per run ``sum_i w_i * node_i ** p`` (equals ``v^T A^p v`` for p < 2m with v the unit start vector)."""
        return (self.weights * self.nodes**p).sum(-1)


def slq_density(op, num_runs: int = 1, num_steps: int = 30, *, generator=None, basis_device=None) -> SpectralDensity:
    """Stochastic Lanczos quadrature with full reorthogonalisation and Rademacher start vectors.

    Cost: ``num_runs * num_steps`` products (``num_steps`` is capped at the operator size).
    """
    check_int("num_runs", num_runs, minimum=1)
    check_int("num_steps", num_steps, minimum=1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = op.shape[0]
    steps = min(num_steps, n)
    nodes, weights, matvecs = [], [], 0
    for _ in range(num_runs):
        start = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        alphas, betas, used = lanczos_tridiagonal(op, start, steps, basis_device=basis_device, generator=generator)
        matvecs += used
        t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        theta, s = torch.linalg.eigh(t)
        nodes.append(theta)
        weights.append(s[0, :] ** 2)
    width = max(x.numel() for x in nodes)
    pad = lambda xs, fill: torch.stack([torch.cat([x, x.new_full((width - x.numel(),), fill)]) for x in xs])  # noqa: E731
    return SpectralDensity(pad(nodes, 0.0), pad(weights, 0.0), matvecs)
