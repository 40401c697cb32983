"""The Lanczos recurrence and the helpers every Krylov routine of :mod:`~lightning_landscape.core` shares.

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

Random vectors are drawn on the CPU from the given generator (Gaussians in float32 for all but float64 operators) and
only then cast and moved, so processes with identically seeded generators draw bitwise identical vectors whatever
their device (what DDP needs: every rank runs the same Lanczos). Vectors stay in the operator's dtype (dot products
too, for float32 and float64; half precision accumulates in float64); only the tridiagonal matrix and its
eigen-decomposition are float64.

Memory: the basis grows by doubling, at most ``2 m x n`` after ``m`` products (never ``max_iter x n``), on
``basis_device`` (``"cpu"`` keeps it off the accelerator).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_choice, check_int

# Guard for "relative to a scale that may be zero" divisions and comparisons.
_TINY = 1e-300
# Elements per float64 chunk in dot products of low-precision vectors (bounds the temporary upcast copies).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------- shared helpers
def random_vector(
    n: int,
    generator: torch.Generator,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """One random ``(n,)`` vector on the CPU (float64 unless ``dtype`` says otherwise): the single source of
    randomness of :mod:`~.core` algorithms.

    Drawing on the CPU (then casting and moving) makes identically seeded generators give bitwise identical vectors
    on every process and device. Gaussian values are drawn in float64 for a float64 request (the default) and in
    float32 for any other: a float32 draw costs a sixth of a float64 one (85k values: 0.23 against 1.34 ms on this
    CPU; a 125M-parameter model's start vector took seconds in float64), and a random start of a float32 operator
    needs no more. (So a float32 operator no longer starts from the float64 stream cast down.) Lanczos start and
    restart vectors are Gaussian; trace probes and SLQ start vectors are Rademacher (``+-1``), so a test can redraw
    them from an identically seeded generator.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n < 1`` or ``distribution`` is unknown.
    """
    check_int("n", n, minimum=1)
    check_choice("distribution", distribution, ("gaussian", "rademacher"))
    if distribution == "rademacher":
        return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(n, generator=generator, dtype=draw).to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype vector bookkeeping runs in for an operator of ``dtype``: its own when float32 or float64, float32
    for half precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


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
        # normalised in the operator's dtype (float32 for half precision), on its device: a float64 host copy of a
        # large model's vector costs more than the normalisation's rounding is worth
        v = v.detach().to(device=self.device, dtype=_work_dtype(self.dtype))
        return (v / v.norm()).to(self.dtype)

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
        fresh = False
        for _ in range(2):  # block Gram-Schmidt twice: orthogonal to working precision ("twice is enough")
            for block in blocks:
                # w - block^T (block w) in place after the first subtraction (which leaves the operator's output
                # untouched): no n-sized temporaries, whose fresh pages cost more than the arithmetic on a small
                # model (a new 85k-float vector faulted in ~1 ms inside a training process here)
                if fresh:
                    w.addmv_(block.mT, block @ w, alpha=-1.0)
                else:
                    w, fresh = torch.addmv(w, block.mT, block @ w, alpha=-1.0), True
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
            r = random_vector(self.n, self.generator, dtype=_work_dtype(self.dtype)).to(self.device, self.dtype)
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
