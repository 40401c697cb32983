"""Effective dimensionality of representations and weights.

Definitions (each from a spectrum; helpers turn a matrix or an accumulated second moment into one):

``rankme``
    RankMe (Garrido, Balestriero, Najman & LeCun, ICML 2023): ``exp(-sum p_k log p_k)`` with
    ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` of the *uncentred* feature matrix (not their squares),
    ``eps = 1e-7``. It is the Roy & Vetterli (2007) effective rank, lies in ``[1, rank]``, and is invariant to the
    scale of the features and to the number of samples (it only sees ``Z^T Z / N``).
``alpha_req``
    alpha-ReQ (Agrawal et al., NeurIPS 2022): the power-law decay ``lambda_i ~ i^-alpha`` of the eigenvalues of the
    *centred* feature covariance, fitted by least squares of ``log lambda_i`` on ``log i`` with weights ``1/i`` over
    ranks ``fit_range = (11, 100)`` (1-based, inclusive; reptrix's reference range), clipped to the positive
    eigenvalues available; with fewer than 11 of them the fit uses ranks 1..n. Small alpha: whitened or noisy
    features; large alpha: collapse.
``stable_rank``
    ``||W||_F^2 / ||W||_2^2 = sum s^2 / s_1^2`` (Rudelson & Vershynin 2007).
``participation_ratio``
    ``(sum lambda)^2 / sum lambda^2`` of the eigenvalues ``lambda`` (of ``Z^T Z`` or of a covariance).
``numerical_rank``
    number of singular values above ``tol * s_1``.

Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_float
from lightning_landscape.core.alerts import DropFromMaxRule

RANKME_EPS = 1e-7


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D matrix (conv kernels: pass ``W.flatten(1)``), descending, float64."""
    if matrix.dim() != 2:
        raise ValueError(f"`matrix` must be 2-D, got shape {tuple(matrix.shape)}.")
    return torch.linalg.svdvals(matrix.detach().double())


def eigenvalues_psd(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric positive semi-definite matrix, descending, clamped at 0, float64."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}.")
    return torch.linalg.eigvalsh(matrix.detach().double()).flip(0).clamp_min(0.0)


def singular_values_from_second_moment(second_moment: Tensor) -> Tensor:
    """Singular values of ``Z`` (up to the factor ``sqrt(N)``) from ``Z^T Z`` or ``Z^T Z / N``."""
    return eigenvalues_psd(second_moment).sqrt()


def covariance_from_moments(second_moment_sum: Tensor, feature_sum: Tensor, count: float) -> Tensor:
    """Centred covariance ``Z^T Z / N - mu mu^T`` from the running sums ``Z^T Z``, ``sum z`` and ``N``."""
    mean = feature_sum.double() / count
    return second_moment_sum.double() / count - torch.outer(mean, mean)


def rankme(singular: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe / Roy-Vetterli effective rank of the singular values ``singular``.

    An all-zero spectrum (every feature dead) gives 0: nothing is represented, the end point of a collapse.
    """
    s = singular.double().clamp_min(0.0)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alpha_req(eigenvalues: Tensor, fit_range: tuple[int, int] = (11, 100)) -> float:
    """alpha-ReQ decay exponent of ``eigenvalues`` (of a centred covariance); NaN with fewer than 3 positive ones."""
    lam = eigenvalues.double().sort(descending=True).values
    lam = lam[lam > lam[0] * 1e-12] if lam.numel() and lam[0] > 0 else lam[:0]
    n = lam.numel()
    if n < 3:
        return math.nan
    first, last = fit_range
    if n < first:
        first = 1
    last = min(last, n)
    if last - first + 1 < 3:
        first = max(1, last - 2)
    ranks = torch.arange(first, last + 1, dtype=torch.float64)
    x, y, w = ranks.log(), lam[first - 1 : last].log(), 1.0 / ranks
    xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    slope = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()
    return float(-slope)


def stable_rank(singular: Tensor) -> float:
    """``sum s^2 / s_1^2``."""
    s = singular.double()
    top = float(s.max()) if s.numel() else 0.0
    return float((s**2).sum()) / top**2 if top > 0 else math.nan


def participation_ratio(eigenvalues: Tensor) -> float:
    """``(sum lambda)^2 / sum lambda^2``."""
    lam = eigenvalues.double().clamp_min(0.0)
    denominator = float((lam**2).sum())
    return float(lam.sum()) ** 2 / denominator if denominator > 0 else math.nan


def numerical_rank(singular: Tensor, tol: float = 1e-6) -> int:
    """Number of singular values above ``tol`` times the largest."""
    s = singular.double()
    return int((s > tol * float(s.max())).sum()) if s.numel() and float(s.max()) > 0 else 0


class RankCollapseRule(DropFromMaxRule):
    """:class:`~lightning_landscape.core.alerts.DropFromMaxRule` that also needs the value under an absolute ``floor``.

    A collapse is a RankMe below ``floor`` *and* below ``(1 - fraction)`` times the maximum of the last ``window``
    values: the representation has fallen onto about ``floor`` directions or fewer, and fast. The floor exists
    because a healthy language model's penultimate features drop ~7x in its first ~10 steps (random-init features
    are high-rank; RankMe 26 -> 3.5 on nanoGPT and GPT-2, then climbing back) without ever going under ~3.5, while
    dying ReLUs end at 0 and a network collapsed onto one direction at 1. ``floor=None``: no floor (the plain
    relative rule). The state (``history``, ``armed``) is that of the parent, so checkpoints are unchanged.
    """

    def __init__(self, fraction: float = 0.75, window: int = 5, floor: float | None = 2.0) -> None:
        super().__init__(fraction, window)
        self.floor = None if floor is None else check_float("floor", floor, minimum=0.0, strict_minimum=True)

    @property
    def threshold(self) -> float:
        relative = super().threshold
        return relative if self.floor is None else min(self.floor, relative)

    def update(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        self.history = [*self.history, value][-self.window :]
        relative = (1.0 - self.fraction) * max(self.history)
        collapsed = value < relative and (self.floor is None or value < self.floor)
        fired = collapsed and self.armed
        self.armed = not collapsed
        return fired
