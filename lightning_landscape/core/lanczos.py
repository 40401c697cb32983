"""Lanczos for the extreme eigenpairs of a symmetric operator: full reorthogonalisation, warm starts, residual stop.

Why our own and not ARPACK (``scipy.sparse.linalg.eigsh``): ARPACK needs at least ~20 products even from the exact
eigenvector (scipy#9470), copies every vector to host NumPy, and cannot be warm-started cheaply. Why not
hessian-eigenthings' default: it stops after ``2k`` steps (two products for the sharpness) whether or not the Ritz
pairs converged. Here the iteration goes on until every requested pair's residual ``|beta_m s_{m,i}|`` is below
``tol`` times the spectral scale, or ``max_iter`` products are spent, and the result says which (``converged``).

Numerics (Lanczos 1950; Parlett, *The Symmetric Eigenvalue Problem*, 1998, ch. 13; Golub & Van Loan, *Matrix
Computations*, 4th ed., sec. 10.1):

* every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt, "twice is enough",
  Giraud et al. 2005), so no spurious copies ("ghosts") of converged eigenvalues appear;
* the tridiagonal matrix ``T`` is accumulated and diagonalised (``eigh``: it is symmetric) in float64, whatever the
  operator's dtype;
* on a breakdown (``beta ~ 0``: the Krylov space is an invariant subspace) the iteration restarts from a random
  vector orthogonal to the basis and records ``beta = 0``, so ``T`` stays block-diagonal and its eigenvalues stay
  eigenvalues of the operator. This is how copies of a repeated eigenvalue are found: a single start vector only
  ever sees one vector of each eigenspace.

Random vectors are drawn in float64 on the CPU from the given generator and only then cast and moved, so processes
with identically seeded generators draw bitwise identical vectors whatever their device (what DDP needs: every rank
runs the same Lanczos).

Vectors stay in the operator's dtype (dot products too, for float32 and float64; half precision accumulates in
float64); only the tridiagonal matrix and its eigen-decomposition are float64.

Memory: the basis grows by doubling, at most ``2 m x n`` after ``m`` products (never ``max_iter x n``), on
``basis_device`` (``"cpu"`` keeps it off the accelerator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int

# Guard for "relative to a scale that may be zero" divisions and comparisons.
_TINY = 1e-300
# Weight of the random part of a warm start, relative to the (unit) combination of the previous vectors.
_WARM_NOISE = 1e-3
# Safety factor of the eigenvalue stopping rule: the estimate r^2 / gap must be 10x below the tolerance, because
# its gap is estimated from Ritz values (dense tests: without it, errors up to 18x the tolerance on dense spectra;
# with it, none at tol 1e-3; benchmarks/RESULTS.md).
_SAFETY = 10.0
# Elements per float64 chunk in dot products of low-precision vectors (bounds the temporary upcast copies).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------- shared helpers
def random_vector(
    n: int, generator: torch.Generator, distribution: Literal["gaussian", "rademacher"] = "gaussian"
) -> Tensor:
    """One random ``(n,)`` float64 vector on the CPU: the single source of randomness of :mod:`~.core` algorithms.

    Drawing in float64 on the CPU (then casting and moving) makes identically seeded generators give bitwise
    identical vectors on every process and device. Lanczos start and restart vectors are Gaussian; trace probes and
    SLQ start vectors are Rademacher (``+-1``), so a test can redraw them from an identically seeded generator.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n < 1`` or ``distribution`` is unknown.
    """
    check_int("n", n, minimum=1)
    check_choice("distribution", distribution, ("gaussian", "rademacher"))
    if distribution == "rademacher":
        return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    return torch.randn(n, generator=generator, dtype=torch.float64)


def _check_operator(op: Any) -> int:
    """Validate the operator protocol; return ``n``."""
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or int(shape[0]) < 1:
        raise ValueError(f"`op` must be a square operator with .shape (n, n) and n >= 1, got shape {shape}.")
    dtype = getattr(op, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`op` must have a real floating-point .dtype, got {dtype!r}.")
    if getattr(op, "device", None) is None:
        raise TypeError(f"`op` must have a .device, got {type(op).__name__} without one.")
    if isinstance(op, Tensor):
        # A dense matrix is cheap to check; a non-symmetric one would give meaningless Ritz values silently.
        dense = op.detach()
        scale = float(dense.abs().max())
        asymmetry = float((dense - dense.mT).abs().max())
        if asymmetry > 1e-4 * scale:
            raise ValueError(
                f"`op` must be symmetric, got a dense matrix with max |A - A^T| = {asymmetry:.3g} "
                f"(max |A| = {scale:.3g})."
            )
    return int(shape[0])


def _check_generator(generator: Any) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {generator!r}.")
    if generator.device.type != "cpu":
        # Vectors are drawn on the CPU so that every device sees the same numbers.
        raise ValueError(f"`generator` must be a CPU torch.Generator, got one on {generator.device}.")
    return generator


def _check_device(name: str, value: Any, default: torch.device) -> torch.device:
    if value is None:
        return torch.device(default)
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`{name}` must be a torch.device, a device string or None, got {value!r}.") from err


def _matvec(op: Any, v: Tensor, n: int) -> Tensor:
    out = op @ v
    if not isinstance(out, Tensor) or out.shape != (n,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"`op` @ v must return a 1-D Tensor with {n} elements, got {got}.")
    return out.detach()


def _matmat(op: Any, block: Tensor, n: int) -> Tensor:
    """``op @ block`` for an ``(n, k)`` block: the operator's own ``matmat`` when it has one (several products per
    pass), else one matvec per column (also for a dense Tensor, so that it and a matrix-free wrapper of it give
    bitwise the same results)."""
    if not isinstance(op, Tensor) and hasattr(op, "matmat"):
        out = op.matmat(block)
        if not isinstance(out, Tensor) or out.shape != block.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"`op`.matmat(V) must return a Tensor of shape {tuple(block.shape)}, got {got}.")
        return out.detach()
    return torch.stack([_matvec(op, column, n) for column in block.unbind(1)], dim=1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``a . b`` in the vectors' own dtype when it is float32 or float64 (a 0-d tensor on their device, so no host
    sync here); half-precision vectors accumulate in float64.

    Why not always float64: an upcast dot of float32 vectors costs a copy of both (37.7 ms against 1.1 ms at 5M
    parameters on CPU, a third of a measurement's bookkeeping), and float32 accumulation (blocked, relative error
    ~1e-7) is far below the ~1e-3 tolerance and the float32 products' own rounding.
    """
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return torch.dot(a, b)
    return _dot64(a, b)


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    """``a . b`` accumulated in float64 (a 0-d tensor on the vectors' device, so no host sync here)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return torch.dot(a, b)
    # Upcast in chunks: a full float64 copy of a low-precision vector would cost two to four times its memory.
    parts = [torch.dot(x.double(), y.double()) for x, y in zip(a.split(_CHUNK), b.split(_CHUNK), strict=True)]
    return torch.stack(parts).sum()


def _scalar(value: Tensor, what: str) -> float:
    out = float(value)
    if not math.isfinite(out):
        # FloatingPointError is what the callbacks catch to log a failed measurement instead of crashing training.
        raise FloatingPointError(f"Lanczos: {what} is not finite ({out}); the operator returned NaN or infinity.")
    return out


# --------------------------------------------------------------------------------------------- the recurrence
class _Krylov:
    """Lanczos recurrence with full reorthogonalisation and random restarts (shared by :func:`lanczos` and SLQ).

    After :meth:`step` the caller either ends, calls :meth:`extend` (no breakdown) or :meth:`restart` (breakdown).
    """

    def __init__(
        self,
        op: Any,
        n: int,
        start: Tensor,
        capacity: int,
        basis_device: torch.device,
        generator: torch.Generator,
        grow: bool = True,
    ) -> None:
        self.op, self.n = op, n
        self.dtype, self.device = op.dtype, torch.device(op.device)
        self.basis_device = basis_device
        self.generator = generator
        # The basis grows in chunks that double the storage (2, 2, 4, 8, ... rows, at most `capacity` in all), so a
        # measurement that stops after m products holds at most 2m vectors, never `max_iter` (100 vectors of a
        # 125M-parameter model are 50 GB). `grow=False` allocates all `capacity` rows at once (SLQ: fixed steps).
        self.capacity = capacity
        self.grow = grow
        self.chunks: list[Tensor] = []
        self.allocated = 0
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples basis vectors j and j + 1 (0 at a restart)
        self.block_starts = [0]
        self.next_beta = 0.0  # coupling of the newest vector to the next one: the residual scale
        self.scale = 0.0  # running max of |alpha|, beta: the spectral scale breakdowns are measured against
        self.matvecs = 0
        # ~0 relative to the scale, with room for the rounding of the operator's dtype (float32 products carry
        # ~1e-7 relative noise, so a "zero" beta there is ~1e-7, not ~1e-16).
        self.breakdown_tol = max(1e-12, 10 * torch.finfo(self.dtype).eps)
        self.q = self._unit(start)
        self._w: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.alphas)

    def _unit(self, v: Tensor) -> Tensor:
        v = v.detach().to(dtype=torch.float64)
        return (v / v.norm()).to(device=self.device, dtype=self.dtype)

    def _blocks(self, count: int) -> list[Tensor]:
        """The first ``count`` basis rows, as views of the chunks."""
        out, start = [], 0
        for chunk in self.chunks:
            rows = min(count - start, chunk.shape[0])
            if rows <= 0:
                break
            out.append(chunk[:rows])
            start += rows
        return out

    def _store(self, j: int, q: Tensor) -> None:
        if j >= self.allocated:
            size = self.capacity - self.allocated
            if self.grow:
                size = min(max(2, self.allocated), size)
            self.chunks.append(torch.empty(size, self.n, dtype=self.dtype, device=self.basis_device))
            self.allocated += size
        start = 0
        for chunk in self.chunks:
            if j < start + chunk.shape[0]:
                chunk[j - start] = q.to(self.basis_device)
                return
            start += chunk.shape[0]

    @property
    def basis(self) -> Tensor:
        """The basis rows so far, ``(size, n)`` (a view when it fits one chunk, else a copy)."""
        blocks = self._blocks(self.size)
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            return torch.empty(0, self.n, dtype=self.dtype, device=self.basis_device)
        return torch.cat(blocks)

    def _orthogonalise(self, w: Tensor, count: int) -> Tensor:
        if count == 0:
            return w
        blocks = self._blocks(count)
        w = w.to(self.basis_device)
        for _ in range(2):  # block Gram-Schmidt twice: orthogonal to working precision ("twice is enough")
            for block in blocks:
                w = w - (block @ w) @ block
        return w.to(self.device)

    def step(self) -> bool:
        """One product and one new basis vector; True on a breakdown (the Krylov space is invariant)."""
        j = self.size
        self._store(j, self.q)
        w = _matvec(self.op, self.q, self.n)
        self.matvecs += 1
        alpha = _scalar(_dot(self.q, w), f"alpha at step {j + 1}")
        w = self._orthogonalise(w, j + 1)  # removes alpha q_j and beta q_{j-1} too, in the same two passes
        beta = math.sqrt(max(_scalar(_dot(w, w), f"beta at step {j + 1}"), 0.0))
        self.alphas.append(alpha)
        self.scale = max(self.scale, abs(alpha), beta)
        if beta <= self.breakdown_tol * max(self.scale, _TINY):
            self.next_beta, self._w = 0.0, None
            return True
        self.next_beta, self._w = beta, w
        return False

    def extend(self) -> None:
        """Continue the recurrence with ``q_{j+1} = w / beta_j``."""
        if self._w is None:  # internal invariant: only called after a step without breakdown
            raise RuntimeError("Lanczos: extend() called without a pending step (a bug in the caller).")
        self.betas.append(self.next_beta)
        self.q = self._w / self.next_beta
        self._w = None

    def restart(self) -> bool:
        """Start a new block from a random vector orthogonal to the basis; False when the basis spans R^n."""
        if self.size >= self.n:
            return False
        floor = 1e3 * torch.finfo(self.dtype).eps
        for _ in range(5):  # a random vector lies in the span with probability 0; retry against rounding bad luck
            r = random_vector(self.n, self.generator).to(device=self.device, dtype=self.dtype)
            r = self._orthogonalise(r / r.norm(), self.size)
            norm = float(r.norm())
            if norm > floor:
                self.betas.append(0.0)
                self.block_starts.append(self.size)
                self.q = r / norm
                return True
        return False

    def tridiagonal(self, start: int = 0, stop: int | None = None) -> Tensor:
        stop = self.size if stop is None else stop
        t = torch.diag(torch.tensor(self.alphas[start:stop], dtype=torch.float64))
        if stop - start > 1:
            off = torch.tensor(self.betas[start : stop - 1], dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` (columns), and residual norms ``|beta_m s_{m,i}|``."""
        theta, s = torch.linalg.eigh(self.tridiagonal())
        return theta, s, (self.next_beta * s[-1, :]).abs()

    def vectors(self, s_columns: Tensor) -> Tensor:
        """Ritz vectors ``basis^T s`` (rows, unit norm) in the operator's dtype and device."""
        weights = s_columns.T.to(dtype=self.dtype, device=self.basis_device)
        out, start = None, 0
        for block in self._blocks(self.size):
            part = weights[:, start : start + block.shape[0]] @ block
            out = part if out is None else out.add_(part)
            start += block.shape[0]
        out = out.to(self.device)
        return out / out.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)

    def block_added_wanted(self, k: int, smallest: bool, slack: float) -> bool:
        """Did the block that just broke down change the wanted Ritz values (top ``k``; the minimum if asked)?

        A first block always counts as new; a later block that found only copies of values already below the k-th
        (or above the minimum) means the rest of the space holds nothing wanted that a restart could reveal.
        """
        start = self.block_starts[-1]
        if start == 0:
            return True
        before = torch.linalg.eigvalsh(self.tridiagonal(0, start))
        block = torch.linalg.eigvalsh(self.tridiagonal(start))
        if before.numel() < k or float(block[-1]) > float(before[-k]) + slack:
            return True
        return smallest and float(block[0]) < float(before[0]) - slack


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


def _start_vector(n: int, init: Any, generator: torch.Generator) -> Tensor:
    noise = random_vector(n, generator)
    noise = noise / noise.norm()
    if init is None:
        return noise
    if not isinstance(init, Tensor) or not init.is_floating_point():
        raise TypeError(f"`init` must be a floating-point Tensor or None, got {init!r}.")
    if init.dim() not in (1, 2) or init.shape[-1] != n or init.numel() == 0:
        raise ValueError(f"`init` must have shape ({n},) or (j, {n}) with j >= 1, got {tuple(init.shape)}.")
    rows = init.detach().reshape(-1, n).to(device="cpu", dtype=torch.float64)
    norms = rows.norm(dim=1)
    if not bool(torch.isfinite(rows).all()) or bool((norms == 0).any()):
        raise ValueError(f"`init` rows must be finite and non-zero, got row norms {norms.tolist()[:8]}.")
    rows = rows / norms[:, None]
    # Random weights in [1, 2]: no previous direction starts with a tiny component (it would converge late) and
    # no unlucky cancellation between nearly parallel rows. The small random part lets a direction that has
    # become sharp since the previous measurement enter the Krylov space.
    weights = 1.0 + torch.rand(rows.shape[0], generator=generator, dtype=torch.float64)
    start = (weights[:, None] * rows).sum(0)
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
    eigenvalue). Where that matters, run again from another ``generator`` and compare.

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

    Returns:
        LanczosResult. Cost: ``num_matvecs`` operator products, at most ``max_iter`` (5-20 cold and 1-10 warm for
        the network Hessians of ``benchmarks/RESULTS.md`` at ``tol=1e-3``), plus ``O(m n)`` work per step for the
        reorthogonalisation, and at most ``2 m n`` memory for the basis (it grows by doubling; ``m`` products).

    Raises:
        TypeError: ``k``, ``max_iter``, ``tol``, ``smallest``, ``init``, ``generator`` or ``op`` has the wrong type.
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
    start = _start_vector(n, init, generator)

    capacity = min(max_iter, n)
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
        v = random_vector(n, generator).to(device=op.device, dtype=op.dtype)
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
