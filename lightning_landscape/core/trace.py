"""Stochastic trace estimators with a standard error: Hutchinson and Hutch++."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_choice, check_int


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (0 where the estimate is exact).
        num_matvecs: operator products used.
        squared_frobenius: estimate of tr(A^2) = ||A||_F^2 from the same probes (Hutchinson only).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    squared_frobenius: float | None = None


def _probes(n: int, m: int, generator: torch.Generator, distribution: str) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (m, n), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
    return torch.randn(m, n, generator=generator, dtype=torch.float64)


def _stderr(samples: Tensor) -> float:
    return float(samples.std(unbiased=True) / math.sqrt(samples.numel())) if samples.numel() > 1 else math.inf


def hutchinson_trace(op, num_matvecs: int = 30, *, generator=None, distribution: str = "rademacher") -> TraceResult:
    """Hutchinson's estimator ``mean(v^T A v)`` (Hutchinson 1989), ``num_matvecs`` products.

    Rademacher probes make it exact on a diagonal matrix; ``mean ||A v||^2`` estimates ``tr(A^2)`` on the same probes.
    """
    check_int("num_matvecs", num_matvecs, minimum=1)
    check_choice("distribution", distribution, ("rademacher", "gaussian"))
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = op.shape[0]
    probes = _probes(n, num_matvecs, generator, distribution)
    quad, sq = [], []
    for v in probes:
        av = (op @ v.to(device=op.device, dtype=op.dtype)).double().cpu()
        quad.append(float(v @ av))
        sq.append(float(av @ av))
    samples = torch.tensor(quad, dtype=torch.float64)
    return TraceResult(float(samples.mean()), _stderr(samples), num_matvecs, float(sum(sq) / len(sq)))


def hutchpp_trace(op, num_matvecs: int = 30, *, generator=None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace of a rank-m/3 sketch plus Hutchinson on the rest.

    Cost ``num_matvecs`` products (>= 3): m/3 for the sketch, m/3 to project, m/3 residual probes. Exact when the
    rank of ``A`` is at most m/3; the standard error comes from the residual Hutchinson samples.
    """
    check_int("num_matvecs", num_matvecs, minimum=3)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = op.shape[0]
    sketch_size = min(num_matvecs // 3, n)
    residual_probes = num_matvecs - 2 * sketch_size

    def apply(v: Tensor) -> Tensor:
        return (op @ v.to(device=op.device, dtype=op.dtype)).double().cpu()

    sketch = torch.stack([apply(s) for s in _probes(n, sketch_size, generator, "rademacher")], dim=1)
    q, _ = torch.linalg.qr(sketch)
    low_rank = float(sum(q[:, i] @ apply(q[:, i]) for i in range(q.shape[1])))
    samples = []
    for g in _probes(n, residual_probes, generator, "rademacher"):
        g_perp = g - q @ (q.T @ g)
        samples.append(float(g_perp @ apply(g_perp)))
    residual = torch.tensor(samples, dtype=torch.float64)
    estimate = low_rank + (float(residual.mean()) if samples else 0.0)
    stderr = _stderr(residual) if len(samples) > 1 else 0.0 if sketch_size >= n else math.inf
    return TraceResult(estimate, stderr, sketch_size + q.shape[1] + residual_probes)
