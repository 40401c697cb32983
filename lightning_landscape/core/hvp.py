"""Hessian-vector products of the mean loss over a fixed list of batches.

The operator is *defined*, not implied: ``H = sum_b (n_b / N) * Hess(loss_fn(module, batch_b))`` over the selected
parameters, where ``n_b`` is the batch size and ``N`` the total over the probe set (over every rank when an
``all_reduce`` is given). Each batch's loss runs with autocast off, under ``torch.enable_grad()``, and with the
global RNG forked and seeded with ``seed + b``, so random layers (dropout) draw the same masks at every matvec.
The module's train/eval flags are the caller's business: :func:`operator_mode` sets them for the two documented
modes and restores each submodule's exact flag afterwards.

Backends (one HVP = one pass over the probe set; times are HVP / gradient on the same data, CPU, measured by
``benchmarks/hessian.py``, see ``benchmarks/RESULTS.md``):

``"graph"``
    Builds each batch's gradient graph once (``create_graph=True``) and reuses it for every matvec, so a matvec is
    one extra backward with no forward: 0.9-1.9x a gradient on CPU once built, the fastest there, hence the CPU
    default. It holds the double-backward graphs of the whole probe set until :meth:`HessianOperator.close`.
``"double_backward"``
    Pearlmutter's trick with ``torch.autograd.grad`` twice, recomputing the forward pass every matvec (2.0-2.5x on
    CPU). Widest op coverage (custom ``autograd.Function`` without a forward-mode rule); the automatic fallback of
    ``"func"``.
``"func"``
    ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse); keeps no graph between matvecs. Losses whose
    forward-mode derivative fails on ZeroTensors (mean-reduced MSE, pytorch#123996) switch to ``torch.func.vjp`` of
    ``torch.func.grad`` (reverse-over-reverse, same product) on the first failure. Slowest on CPU
    (2.8-6.6x: dual-number forward plus ``functional_call`` overhead) but, per curvlinops' published GPU
    measurements, 30-37 % less peak memory than double backward at equal or better time, hence the default on
    accelerators (not re-measured by us: no GPU was available when the default was set).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape.core._sdpa import differentiable_attention
from lightning_landscape.core._validation import LandscapeWarning, check_choice
from lightning_landscape.core.modes import MODES, default_batch_size, operator_mode, seeded_rng
from lightning_landscape.core.params import flatten, select_parameters, unflatten

LossFn = Callable[[nn.Module, Any], Tensor]
Backend = Literal["auto", "func", "double_backward", "graph"]

BACKENDS = ("auto", "func", "double_backward", "graph")


class NonFiniteLossError(FloatingPointError):
    """The loss or a Hessian-vector product over the probe set is NaN or infinite."""


def default_backend(device: torch.device) -> str:
    """The backend ``"auto"`` resolves to on ``device`` (measured; see the module docstring)."""
    return "graph" if device.type == "cpu" else "func"


class _LossModule(nn.Module):
    """Wraps ``loss_fn(module, batch)`` as a module so ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


def check_loss(loss: Any, name: str = "loss_fn") -> Tensor:
    """Return ``loss`` if it is a scalar floating tensor; raise a ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`{name}` must return a scalar Tensor (the mean loss of the batch), got {type(loss).__name__}."
        )
    if loss.numel() != 1:
        raise TypeError(
            f"`{name}` must return a scalar Tensor (the mean loss of the batch), got shape {tuple(loss.shape)}."
        )
    if not loss.is_floating_point():
        raise TypeError(f"`{name}` must return a floating-point Tensor, got dtype {loss.dtype}.")
    return loss.reshape(())


def _check_finite(product: Tensor) -> None:
    # One reduction instead of an elementwise isfinite pass: NaN and inf propagate into the sum. It accumulates in at
    # least float32, so a sum of finite half-precision values cannot overflow (float16 tops out at 65504); a float32
    # sum overflows only near 3e38, itself a sign of a diverging run.
    accumulate = torch.float64 if product.dtype == torch.float64 else torch.float32
    if not bool(torch.isfinite(product.sum(dtype=accumulate))):
        raise NonFiniteLossError("A Hessian-vector product over the probe set is not finite.")


class HessianOperator:
    """The Hessian of the size-weighted mean loss over a fixed probe set, as a matrix-free operator.

    Use as ``H @ v`` with a flat vector over the selected parameters (``named_parameters()`` order). It satisfies the
    operator protocol of :mod:`lightning_landscape.core` (``shape``, ``dtype``, ``device``, ``@``). Every product
    runs inside :func:`~lightning_landscape.core._sdpa.differentiable_attention`: attention uses the math kernel
    (the fused ones have no double backward) and ``torch.compile``-d modules run eagerly (compiled backward graphs
    have none either), so the operator works on ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention`` and
    compiled models as it is, without the callbacks.

    Args:
        module: the model; its parameters are read, never written.
        loss_fn: ``loss_fn(module, batch) -> scalar Tensor``, the *mean* loss over the batch.
        batches: the probe set (already on the module's device).
        params: the parameters to differentiate (a dict from :func:`select_parameters`); default all trainable.
        backend: ``"auto"``, ``"func"``, ``"double_backward"`` or ``"graph"`` (see the module docstring).
        batch_size_fn: ``batch -> int`` used for the weights; default :func:`default_batch_size`.
        seed: each batch's loss runs with the global RNG forked and seeded ``seed + index``; ``None`` leaves the
            RNG alone (only safe when the loss is deterministic).
        all_reduce: in-place sum over ranks (``core.distributed.all_reduce_sum``) for the global-data Hessian under
            data parallelism: one collective per matvec on the flat vector, plus one for the sample count.
        batch_probes: how :meth:`matmat` multiplies a block of vectors: ``True``, one vmapped backward pass per
            batch for the whole block (autograd's ``is_grads_batched``); ``False``, one product per vector. ``None``
            (default): batched on accelerators, where a product is bound by per-kernel overhead, one at a time on
            CPU, where we measured it slower beyond toy sizes (0.6-1.0x at 26k-300k parameters, 1.3-1.9x at 2.4k;
            ``benchmarks/RESULTS.md``).

    Raises:
        TypeError: ``loss_fn`` is not callable, or the parameters mix dtypes or devices.
        ValueError: ``batches`` is empty or ``backend`` unknown.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        params: Mapping[str, nn.Parameter] | None = None,
        backend: Backend = "auto",
        batch_size_fn: Callable[[Any], int] | None = None,
        seed: int | None = 0,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        batch_probes: bool | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
        check_choice("backend", backend, BACKENDS)
        if len(batches) == 0:
            raise ValueError("`batches` must hold at least one batch, got an empty sequence.")
        self.module = module
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.params: dict[str, nn.Parameter] = dict(params) if params is not None else select_parameters(module)
        first = next(iter(self.params.values()))
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params.values()):
            raise TypeError("`params` must share one dtype and one device to form a flat vector.")
        self.dtype = first.dtype
        self.device = first.device
        n = sum(p.numel() for p in self.params.values())
        self.shape = (n, n)
        self.seed = seed
        self.all_reduce = all_reduce
        self.backend = default_backend(self.device) if backend == "auto" else backend
        if batch_probes is not None and not isinstance(batch_probes, bool):
            raise TypeError(f"`batch_probes` must be None or a bool, got {batch_probes!r}.")
        self.batch_probes = self.device.type != "cpu" if batch_probes is None else batch_probes
        self._fallback_allowed = backend == "auto"
        size_fn = batch_size_fn or default_batch_size
        sizes = torch.tensor([float(size_fn(b)) for b in self.batches], dtype=torch.float64)
        total = sizes.sum().reshape(1).to(self.device)
        if all_reduce is not None:
            total = all_reduce(total)
        self.num_samples = int(total.item())
        self.weights = (sizes / total.cpu()).tolist()
        self.num_matvecs = 0
        self._func_reverse = False  # "func" switched to reverse-over-reverse (a loss without forward-mode support)
        self._graphs: list[tuple[Tensor, ...] | None] = [None] * len(self.batches)

    # ----------------------------------------------------------------------------------------------- protocol
    def __matmul__(self, vector: Tensor) -> Tensor:
        return self.matvec(vector)

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the cached gradient graphs of the ``"graph"`` backend (no graph may outlive a measurement)."""
        self._graphs = [None] * len(self.batches)

    def matvec(self, vector: Tensor) -> Tensor:
        """Return ``H @ vector`` (flat, in the parameters' dtype and device).

        Raises:
            ValueError: ``vector`` has the wrong size.
            NonFiniteLossError: the loss or the product is NaN or infinite.
        """
        if vector.dim() != 1 or vector.numel() != self.shape[0]:
            raise ValueError(f"`vector` must be 1-D with {self.shape[0]} elements, got shape {tuple(vector.shape)}.")
        vector = vector.to(device=self.device, dtype=self.dtype)
        tangents = unflatten(vector, self.params)
        out: Tensor | None = None
        for index, batch in enumerate(self.batches):
            product = self._batch_hvp(index, batch, tangents)
            if out is None:  # the first product is fresh memory: scale it in place instead of adding to zeros
                out = product.mul_(self.weights[index]) if self.weights[index] != 1.0 else product
            else:
                out.add_(product, alpha=self.weights[index])
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        _check_finite(out)
        self.num_matvecs += 1
        return out

    def matmat(self, block: Tensor) -> Tensor:
        """Return ``H @ block`` for an ``(n, k)`` block of vectors (``k`` products; see ``batch_probes``).

        Raises:
            ValueError: ``block`` has the wrong shape.
            NonFiniteLossError: the loss or a product is NaN or infinite.
        """
        if block.dim() != 2 or block.shape[0] != self.shape[0]:
            raise ValueError(f"`block` must be 2-D with {self.shape[0]} rows, got shape {tuple(block.shape)}.")
        if not self.batch_probes or self.backend == "func" or block.shape[1] == 1:
            return torch.stack([self.matvec(column) for column in block.unbind(1)], dim=1)
        block = block.to(device=self.device, dtype=self.dtype)
        count = block.shape[1]
        rows = block.T.contiguous()  # (k, n): one vector per row, split into (k, *shape) per parameter
        tangents = {
            name: chunk.reshape(count, *p.shape)
            for (name, p), chunk in zip(
                self.params.items(), rows.split([p.numel() for p in self.params.values()], dim=1), strict=True
            )
        }
        out = torch.zeros(count, self.shape[0], dtype=self.dtype, device=self.device)
        try:
            for index, batch in enumerate(self.batches):
                if self.backend == "graph":
                    if self._graphs[index] is None:
                        self._graphs[index] = self._gradients(index, batch)
                    grads, retain = self._graphs[index], True
                else:
                    grads, retain = self._gradients(index, batch), False
                out.add_(self._second_backward(grads, tangents, retain, batched=count), alpha=self.weights[index])
        except RuntimeError as err:
            if isinstance(err, NonFiniteLossError):
                raise
            # an op without a batching rule: products one at a time from now on
            warnings.warn(
                f"Batched Hessian-vector products failed ({str(err).splitlines()[0][:200]}); multiplying one vector "
                "at a time (batch_probes=False).",
                LandscapeWarning,
                stacklevel=2,
            )
            self.batch_probes = False
            return self.matmat(block)
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        _check_finite(out)
        self.num_matvecs += count
        return out.T

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The mean loss and its flat gradient over the probe set (global under ``all_reduce``)."""
        out = torch.zeros(self.shape[0] + 1, dtype=self.dtype, device=self.device)
        names = list(self.params)
        for index, batch in enumerate(self.batches):
            with self._batch_context(index):
                loss = self._loss(batch)
                grads = torch.autograd.grad(loss, [self.params[k] for k in names], allow_unused=True)
            flat = flatten(
                g if g is not None else torch.zeros_like(self.params[k]) for k, g in zip(names, grads, strict=False)
            )
            out[:-1].add_(flat.detach(), alpha=self.weights[index])
            out[-1] += loss.detach() * self.weights[index]
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        return float(out[-1]), out[:-1]

    # ----------------------------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _batch_context(self, index: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=self.device.type, enabled=False))
            # twice-differentiable attention kernel, compiled modules run eagerly: the operator works on any model,
            # not only inside the callbacks (which enter the same context around a measurement)
            stack.enter_context(differentiable_attention())
            if self.seed is not None:
                stack.enter_context(seeded_rng(self.device, self.seed + index))
            yield

    def _loss(self, batch: Any) -> Tensor:
        loss = check_loss(self.loss_fn(self.module, batch))
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteLossError(f"The probe-set loss is not finite ({loss.item()}).")
        return loss

    def _batch_hvp(self, index: int, batch: Any, tangents: dict[str, Tensor]) -> Tensor:
        if self.backend == "func":
            try:
                return self._hvp_func(index, batch, tangents)
            except (NotImplementedError, RuntimeError) as err:
                if not self._fallback_allowed or isinstance(err, NonFiniteLossError):
                    raise
                warnings.warn(
                    f"Forward-over-reverse HVP failed ({str(err).splitlines()[0][:200]}); falling back to "
                    "backend='double_backward'.",
                    LandscapeWarning,
                    stacklevel=2,
                )
                self.backend = "double_backward"
        if self.backend == "graph":
            return self._hvp_graph(index, batch, tangents)
        return self._hvp_double_backward(index, batch, tangents)

    def _gradients(self, index: int, batch: Any) -> tuple[Tensor, ...]:
        with self._batch_context(index):
            loss = self._loss(batch)
            grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=True, allow_unused=True)
        return tuple(
            g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params.values(), strict=False)
        )

    def _second_backward(
        self, grads: tuple[Tensor, ...], tangents: dict[str, Tensor], retain: bool, batched: int = 0
    ) -> Tensor:
        """One backward through the gradient graph: ``H v`` flat, or with ``batched = k`` tangents of shape
        ``(k, *p.shape)``, the ``(k, n)`` rows ``H v_i`` from one vmapped pass."""
        params = list(self.params.values())
        # Parameters that enter the loss only linearly (or not at all) have no graph behind their gradient.
        pairs = [(g, t, i) for i, (g, t) in enumerate(zip(grads, tangents.values(), strict=False)) if g.requires_grad]
        lead = (batched,) if batched else ()

        def zeros(p: Tensor) -> Tensor:
            return torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)

        out: list[Tensor] = [zeros(p) for p in params] if not pairs else []
        if pairs:
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    [g for g, _, _ in pairs],
                    params,
                    grad_outputs=[t for _, t, _ in pairs],
                    retain_graph=retain,
                    allow_unused=True,
                    is_grads_batched=bool(batched),
                )
            # zeros only where a parameter does not reach the loss (allocating them all cost ~5% of an HVP)
            out = [h if h is not None else zeros(p) for h, p in zip(hv, params, strict=True)]
        if batched:
            return torch.cat([h.detach().reshape(batched, -1) for h in out], dim=1)
        return flatten(out).detach()

    def _hvp_double_backward(self, index: int, batch: Any, tangents: dict[str, Tensor]) -> Tensor:
        return self._second_backward(self._gradients(index, batch), tangents, retain=False)

    def _hvp_graph(self, index: int, batch: Any, tangents: dict[str, Tensor]) -> Tensor:
        if self._graphs[index] is None:
            self._graphs[index] = self._gradients(index, batch)
        return self._second_backward(self._graphs[index], tangents, retain=True)

    def _hvp_func(self, index: int, batch: Any, tangents: dict[str, Tensor]) -> Tensor:
        wrapper = _LossModule(self.module, self.loss_fn)
        names = list(self.params)
        primals = {k: p.detach() for k, p in self.params.items()}

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            return check_loss(torch.func.functional_call(wrapper, {f"inner.{k}": v for k, v in p.items()}, (batch,)))

        directions = {k: tangents[k] for k in names}
        with self._batch_context(index):
            if not self._func_reverse:
                try:
                    _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (directions,))
                    return flatten(hv[k] for k in names).detach()
                except RuntimeError as err:
                    # Forward-mode AD of some losses trips over ZeroTensors (mean-reduced MSE: "ZeroTensors are
                    # immutable", pytorch#123996). Reverse-over-reverse needs no forward-mode rule: H v = vjp of
                    # the gradient with v (H is symmetric); still functional, still no graph between matvecs.
                    if "ZeroTensor" not in str(err):
                        raise
                    self._func_reverse = True
            _, vjp = torch.func.vjp(torch.func.grad(loss_of), primals)
            (hv,) = vjp(directions)
        return flatten(hv[k] for k in names).detach()


# re-exported: their home moved to core.modes / core.scaled, `from lightning_landscape.core.hvp import ...` still works
from lightning_landscape.core.scaled import DiagonalScaledOperator  # noqa: E402

__all__ = [
    "BACKENDS",
    "MODES",
    "DiagonalScaledOperator",
    "HessianOperator",
    "NonFiniteLossError",
    "check_loss",
    "default_backend",
    "default_batch_size",
    "operator_mode",
    "seeded_rng",
]
