"""Dense ground truth for tiny models: the full Hessian of the probe-set loss, built column by column.

Used by the tests, examples and benchmarks to check every matrix-free routine exactly (in float64). It follows
the operator definition of :mod:`lightning_landscape.core.hvp` (size-weighted mean over batches, RNG seeded with
``seed + index`` per batch, autocast off) but computes the Hessian with ``torch.autograd.functional.hessian`` of a
function of the flat parameter vector, independently of the HVP backends. Cost: O(n) backward passes and n^2
memory, hence the ``max_dim`` guard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.core.hvp import LossFn, _LossModule, check_loss, default_batch_size
from lightning_landscape.core.params import flatten, select_parameters, unflatten


def dense_hessian(
    module: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    params: Mapping[str, nn.Parameter] | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    seed: int | None = 0,
    max_dim: int = 4000,
) -> Tensor:
    """The dense ``(n, n)`` Hessian of the size-weighted mean loss over ``batches``.

    Raises:
        ValueError: more than ``max_dim`` parameters are selected.
    """
    params = dict(params) if params is not None else select_parameters(module)
    n = sum(p.numel() for p in params.values())
    if n > max_dim:
        raise ValueError(f"`params` must have at most max_dim={max_dim} elements for a dense Hessian, got {n}.")
    size_fn = batch_size_fn or default_batch_size
    sizes = [float(size_fn(b)) for b in batches]
    total = sum(sizes)
    point = flatten(p.detach() for p in params.values())
    wrapper = _LossModule(module, loss_fn)

    def mean_loss(flat: Tensor) -> Tensor:
        replaced = unflatten(flat, params)
        value = flat.new_zeros(())
        for index, (batch, size) in enumerate(zip(batches, sizes, strict=True)):
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.default_generator.manual_seed(seed + index)
                loss = torch.func.functional_call(wrapper, {f"inner.{k}": v for k, v in replaced.items()}, (batch,))
            value = value + check_loss(loss) * (size / total)
        return value

    with torch.enable_grad():
        hessian = torch.autograd.functional.hessian(mean_loss, point)
    return hessian.detach()


def dense_eigvalsh(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix in descending order, computed in float64."""
    return torch.linalg.eigvalsh(matrix.double()).flip(0)
