"""Lanczos for the extreme eigenpairs of a symmetric operator: full reorthogonalisation, warm starts, residual stop.

Why our own and not ARPACK (``scipy.sparse.linalg.eigsh``): ARPACK needs at least ~20 products even from the exact
eigenvector (scipy#9470), copies every vector to host NumPy, and cannot be warm-started cheaply. Why not
hessian-eigenthings' default: it stops after ``2k`` steps (two products for the sharpness) whether or not the Ritz
pairs converged. Here the iteration goes on until every requested pair's residual ``|beta_m s_{m,i}|`` is below
``tol`` times the spectral scale, or ``max_iter`` products are spent, and the result says which (``converged``).

The recurrence itself (full reorthogonalisation, float64 tridiagonal, random restarts after a breakdown, a basis
that grows by doubling) lives in :mod:`~lightning_landscape.core._krylov`; fixed-step Lanczos for SLQ and the
power-iteration baseline in :mod:`~lightning_landscape.core.tridiagonal` (both re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_landscape.core._krylov import (
    _TINY,
    _check_device,
    _check_generator,
    _check_operator,
    _Krylov,
    _work_dtype,
    random_vector,
)
from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int
from lightning_landscape.core.tridiagonal import (
    KrylovDecomposition,
    PowerIterationResult,
    lanczos_tridiagonal,
    power_iteration,
)

# Weight of the random part of a warm start, relative to the (unit) combination of the previous vectors.
_WARM_NOISE = 1e-3
# Safety factor of the eigenvalue stopping rule: the estimate r^2 / gap must be 10x below the tolerance, because
# its gap is estimated from Ritz values (dense tests: without it, errors up to 18x the tolerance on dense spectra;
# with it, none at tol 1e-3; benchmarks/RESULTS.md).
_SAFETY = 10.0


def _spectral_scale(theta: Tensor) -> float:
    return max(abs(float(theta[0])), abs(float(theta[-1])), _TINY)


def error_estimates(theta: Tensor, residuals: Tensor, safety: float = 1.0) -> Tensor:
    """A-posteriori eigenvalue error estimates of Ritz values ``theta`` with residual norms ``residuals``.

    For a symmetric operator each Ritz value lies within its residual ``r_i`` of an eigenvalue, and within
    ``r_i^2 / delta_i`` when no other eigenvalue lies within ``delta_i`` of ``theta_i`` (Kato-Temple; Parlett 1998,
    sec. 11.7). ``delta_i`` is estimated from the other Ritz values, each moved towards ``theta_i`` by its own
    residual: ``delta_i = min_j (|theta_i - theta_j| - r_j)``. The estimate is ``min(r_i, safety r_i^2 / delta_i)``
    (``r_i`` when ``delta_i <= 0``). It can be too small only when an eigenvalue near ``theta_i`` has no Ritz value
    yet (its eigenvector is nearly orthogonal to the Krylov space), the blind spot of every Krylov method.
    """
    m = theta.numel()
    if m < 2:
        return residuals.clone()
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(math.inf)
    gap = distance.min(dim=1).values
    quadratic = torch.where(gap > 0, safety * residuals.square() / gap.clamp_min(_TINY), residuals)
    return torch.minimum(residuals, quadratic)


def _converged(
    theta: Tensor, residuals: Tensor, k: int, smallest: bool, tol: float, criterion: str = "eigenvalue"
) -> bool:
    if theta.numel() < k:
        return False
    limit = tol * _spectral_scale(theta)
    errors = error_estimates(theta, residuals, _SAFETY) if criterion == "eigenvalue" else residuals
    done = bool((errors[-k:] <= limit).all())
    return done and (not smallest or bool(errors[0] <= limit))


def _start_vector(n: int, init: Any, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The unit start vector (in the operator's working dtype, on its device): random, or a warm start from ``init``.

    Computed where the operator lives: the previous eigenvectors of a GPU model were copied to the host in float64
    and back (a 125M-parameter row is 1 GB in float64), and the float64 draw alone cost 1.3 ms of a ~10 ms
    measurement on the digits MLP."""
    work = _work_dtype(dtype)
    noise = random_vector(n, generator, dtype=work).to(device)
    noise = noise / noise.norm()
    if init is None:
        return noise
    if not isinstance(init, Tensor) or not init.is_floating_point():
        raise TypeError(f"`init` must be a floating-point Tensor or None, got {init!r}.")
    if init.dim() not in (1, 2) or init.shape[-1] != n or init.numel() == 0:
        raise ValueError(f"`init` must have shape ({n},) or (j, {n}) with j >= 1, got {tuple(init.shape)}.")
    rows = init.detach().reshape(-1, n).to(device=device, dtype=work)
    norms = rows.norm(dim=1)
    if not bool(torch.isfinite(rows).all()) or bool((norms == 0).any()):
        raise ValueError(f"`init` rows must be finite and non-zero, got row norms {norms.tolist()[:8]}.")
    # Random weights in [1, 2]: no previous direction starts with a tiny component (it would converge late) and
    # no unlucky cancellation between nearly parallel rows. The small random part lets a direction that has
    # become sharp since the previous measurement enter the Krylov space.
    weights = 1.0 + torch.rand(rows.shape[0], generator=generator, dtype=torch.float64)
    start = ((weights.to(device=device, dtype=work) / norms)[:, None] * rows).sum(0)
    norm = float(start.norm())
    return noise if norm == 0.0 else start / norm + _WARM_NOISE * noise


# --------------------------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class LanczosResult:
    """Outcome of :func:`lanczos`.

    Attributes:
        eigenvalues: (k,) float64, the top-k Ritz values (algebraically largest), descending.
        eigenvectors: (k, n) unit Ritz vectors in the operator's dtype and device, row i for ``eigenvalues[i]``.
        residuals: (k,) float64 Ritz residual norms ``|beta_m s_{m,i}|`` (equal to ``||A y - theta y||`` in exact
            arithmetic with full reorthogonalisation).
        lambda_min: the smallest Ritz value when ``smallest=True``, else None.
        lambda_min_vector: its unit Ritz vector, else None.
        lambda_min_residual: its residual norm, else None.
        converged: every requested pair met ``residual <= tol * scale`` (or the Krylov space is all of R^n).
        num_matvecs: operator products used.
        alphas: float64 diagonal of the tridiagonal matrix used.
        betas: float64 off-diagonal (0 where the iteration restarted after a breakdown).
        error_bounds: (k,) float64 a-posteriori eigenvalue error estimates of ``eigenvalues``
            (:func:`error_estimates`: ``min(r, r^2 / gap)``).
        lambda_min_error_bound: the same for ``lambda_min`` when ``smallest=True``, else None.
        basis_vectors_allocated: basis rows allocated (at most twice the products used, never ``max_iter``).
        verified: with ``verify=True``, whether a second, independent random start agreed on the extreme
            eigenvalues (False: it found a more extreme one, and those values are reported); None without ``verify``.
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
    error_bounds: Tensor | None = None
    lambda_min_error_bound: float | None = None
    basis_vectors_allocated: int = 0
    verified: bool | None = None


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
    criterion: Literal["eigenvalue", "residual"] = "eigenvalue",
    verify: bool = False,
) -> LanczosResult:
    """Top-``k`` eigenpairs (and optionally the smallest) of a symmetric operator by Lanczos.

    Stopping rule, checked after every product once ``k`` Ritz pairs exist, with ``scale = max(|theta_max|,
    |theta_min|)`` the spectral scale of the current Ritz values (``|theta_1|``, the sharpness, whenever the top
    eigenvalue dominates, as for a Hessian):

    * ``criterion="eigenvalue"`` (default): pair ``i`` has converged when its residual, or ten times its quadratic
      eigenvalue error estimate, is below the tolerance: ``min(r_i, 10 r_i^2 / gap_i) <= tol * scale``
      (:func:`error_estimates`; never later than the residual rule;
      ``r_i = |beta_m s_{m,i}|`` the Ritz residual, ``gap_i`` the distance to the other Ritz values less their
      residuals; the factor 10 covers the gap being estimated from Ritz values). ``tol`` is then the relative
      accuracy of the eigenvalues, and the iteration stops once they are accurate, without waiting for the
      eigenvectors (residual down to ``sqrt(tol * scale * gap / 10)`` instead of ``tol * scale``). Tested against
      dense ``eigvalsh`` (``tests/core/test_lanczos.py``): the error stayed below ``tol * scale`` on every dense
      test spectrum at ``tol = 1e-3``; its known failure is a cluster of eigenvalues whose spread exceeds ``tol``
      but lies inside the residual (top cluster of relative spread 2e-4 at ``tol = 1e-6``), where a Ritz value
      averaging the cluster looks converged: use ``criterion="residual"`` for tight tolerances on clustered
      spectra.
    * ``criterion="residual"``: when the residual itself is ``<= tol * scale`` (eigenvectors accurate too).

    The iteration runs until the top ``k`` (and, with ``smallest``, the smallest) pairs have converged, the Krylov
    space is all of R^n (then exact), or ``max_iter`` products are spent; there is no minimum beyond ``k`` and no
    fixed Krylov size.

    What ``converged`` guarantees: each reported Ritz value lies within its residual of an eigenvalue of ``op``
    (exact arithmetic), and within its ``error_bounds`` entry when no unseen eigenvalue lies between it and its
    neighbours. It does not guarantee that the reported values are the *extreme* eigenvalues: an eigenvalue whose
    eigenvector is nearly orthogonal to the start vector can be missed by any Krylov method (observed: with
    ``smallest=True`` at ``tol=1e-3``, one of five seeds on a transformer Hessian converged to the second-smallest
    eigenvalue). Where that matters, pass ``verify=True``.

    What ``verify=True`` adds: a second run from an independent random start (the generator's next Gaussian
    draw, cold, the same rule and ``max_iter``); where it finds a larger top eigenvalue (or a smaller minimum) by
    more than both runs' error bounds plus ``tol * scale``, the first run provably missed one (every Ritz value is a
    Rayleigh quotient of ``op``), its values replace the first run's and ``verified`` is False. ``verified=True``
    guarantees what ``converged`` does, and that the extreme values were confirmed by two independent random
    starts: an eigenvalue beyond them can only have been missed if its eigenvector is nearly orthogonal to both
    (for a Gaussian start, ``|v . u| < delta`` has probability about ``delta * sqrt(2 n / pi)``, independently
    per start). Cost: the second run's products (about a cold run's), reported in ``num_matvecs``.

    A warm start (``init``: the previous measurement's eigenvectors) combines the rows with random weights in
    ``[1, 2]`` and adds a random part of relative size 1e-3, so that a direction which has become sharp since then
    can still enter the Krylov space. From the exact top-k eigenvectors of an operator whose top k are separated
    from the rest of the spectrum (Hessian outliers), the top-k pairs converge in about ``k + 1`` products; when
    the spectrum is dense up to the top, the random part has to be filtered out and costs more products.

    Limitation of every single-vector Krylov method: one start vector sees one direction per eigenspace, so a
    repeated eigenvalue shows up once per block. Further copies are found when the Krylov space becomes invariant
    (a breakdown, then a random restart), which is exact on small operators with few distinct eigenvalues; on a
    large operator with an exactly repeated top eigenvalue the copies may be missed.

    Args:
        op: operator (``shape == (n, n)``, ``dtype``, ``device``, ``op @ v``) or a dense symmetric Tensor.
        k: number of largest eigenvalues, ``1 <= k <= n``.
        smallest: also converge the smallest (most negative) eigenvalue.
        tol: relative residual tolerance, ``> 0``.
        max_iter: most products to spend, ``>= k``.
        init: warm start, ``(n,)`` or ``(j, n)``, e.g. the previous measurement's eigenvectors.
        generator: CPU source of the random vectors (default: a fresh generator seeded with 0).
        basis_device: where the Krylov basis lives (default: the operator's device; ``"cpu"`` saves accelerator
            memory at the price of host-device copies).
        criterion: ``"eigenvalue"`` or ``"residual"`` (see the stopping rule).
        verify: check the extreme eigenvalues against a second, independent random start (see above).

    Returns:
        LanczosResult. Cost: ``num_matvecs`` operator products, at most ``max_iter`` (5-20 cold and 1-10 warm for
        the network Hessians of ``benchmarks/RESULTS.md`` at ``tol=1e-3``), plus ``O(m n)`` work per step for the
        reorthogonalisation, and at most ``2 m n`` memory for the basis (it grows by doubling; ``m`` products).

    Raises:
        TypeError: ``k``, ``max_iter``, ``tol``, ``smallest``, ``verify``, ``init``, ``generator`` or ``op`` has the
            wrong type.
        ValueError: ``k``, ``max_iter``, ``tol``, ``init``, ``basis_device``, ``generator``, ``criterion`` or ``op``
            is invalid.
        FloatingPointError: the operator returned a non-finite product.

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
    check_bool("smallest", smallest)
    tol = check_float("tol", tol, minimum=0.0, strict_minimum=True)
    check_int("max_iter", max_iter, minimum=k)
    check_choice("criterion", criterion, ("eigenvalue", "residual"))
    generator = _check_generator(generator)
    basis_device = _check_device("basis_device", basis_device, op.device)
    check_bool("verify", verify)
    start = _start_vector(n, init, generator, op.dtype, torch.device(op.device))
    capacity = min(max_iter, n)
    first = _run(op, n, start, k, smallest, tol, capacity, criterion, basis_device, generator)
    if not verify:
        return first
    # An independent cold start (the next draw of the same generator): a missed extreme eigenvalue must then be
    # nearly orthogonal to both start vectors.
    cold = random_vector(n, generator, dtype=_work_dtype(op.dtype))
    second = _run(op, n, cold, k, smallest, tol, capacity, criterion, basis_device, generator)
    return _reconcile(first, second, smallest, tol)


def _run(
    op: Any,
    n: int,
    start: Tensor,
    k: int,
    smallest: bool,
    tol: float,
    capacity: int,
    criterion: str,
    basis_device: torch.device,
    generator: torch.Generator,
) -> LanczosResult:
    """One Lanczos run from ``start`` with the stopping rule of :func:`lanczos`."""
    krylov = _Krylov(op, n, start, capacity, basis_device, generator)
    while True:
        breakdown = krylov.step()
        theta, s, residuals = krylov.ritz()
        if krylov.size >= capacity:
            break
        if breakdown:
            # Every Ritz pair is exact now, but copies of a repeated eigenvalue (invisible from this start vector)
            # may sit in the rest of the space: restart unless the last restart found nothing wanted.
            slack = tol * _spectral_scale(theta)
            if krylov.size >= k and not krylov.block_added_wanted(k, smallest, slack):
                break
            if not krylov.restart():
                break
        else:
            if krylov.size >= k and _converged(theta, residuals, k, smallest, tol, criterion):
                break
            krylov.extend()

    m = krylov.size
    kk = min(k, m)
    top = torch.arange(m - 1, m - 1 - kk, -1)
    converged = m >= n or _converged(theta, residuals, k, smallest, tol, criterion)
    errors = error_estimates(theta, residuals)
    return LanczosResult(
        eigenvalues=theta[top].clone(),
        eigenvectors=krylov.vectors(s[:, top]),
        residuals=residuals[top].clone(),
        lambda_min=float(theta[0]) if smallest else None,
        lambda_min_vector=krylov.vectors(s[:, :1])[0] if smallest else None,
        lambda_min_residual=float(residuals[0]) if smallest else None,
        converged=converged,
        num_matvecs=krylov.matvecs,
        alphas=torch.tensor(krylov.alphas, dtype=torch.float64),
        betas=torch.tensor(krylov.betas[: m - 1], dtype=torch.float64),
        error_bounds=errors[top].clone(),
        lambda_min_error_bound=float(errors[0]) if smallest else None,
        basis_vectors_allocated=krylov.allocated,
    )


def _reconcile(first: LanczosResult, second: LanczosResult, smallest: bool, tol: float) -> LanczosResult:
    """The first run's result checked against the second's: where the second found a more extreme eigenvalue
    (beyond both runs' error bounds plus ``tol * scale``), its values replace the first's and ``verified`` is
    False. Every Ritz value is a Rayleigh quotient, so a top value above the first run's (a minimum below it) is
    proof that the first run missed an eigenvalue, not noise."""
    scale = max(abs(float(r.eigenvalues[0])) for r in (first, second))
    if smallest:
        scale = max(scale, abs(first.lambda_min), abs(second.lambda_min))
    slack = tol * max(scale, _TINY)
    top_slack = slack + float(first.error_bounds[0]) + float(second.error_bounds[0])
    top_missed = float(second.eigenvalues[0]) > float(first.eigenvalues[0]) + top_slack
    min_missed = False
    if smallest:
        min_slack = slack + first.lambda_min_error_bound + second.lambda_min_error_bound
        min_missed = second.lambda_min < first.lambda_min - min_slack
    top = second if top_missed else first
    bottom = second if min_missed else first
    return replace(
        top,
        lambda_min=bottom.lambda_min,
        lambda_min_vector=bottom.lambda_min_vector,
        lambda_min_residual=bottom.lambda_min_residual,
        lambda_min_error_bound=bottom.lambda_min_error_bound,
        converged=top.converged and bottom.converged,
        num_matvecs=first.num_matvecs + second.num_matvecs,
        basis_vectors_allocated=max(first.basis_vectors_allocated, second.basis_vectors_allocated),
        verified=not (top_missed or min_missed),
    )


__all__ = [
    "KrylovDecomposition",
    "LanczosResult",
    "PowerIterationResult",
    "error_estimates",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "random_vector",
]
