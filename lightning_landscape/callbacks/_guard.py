"""The model-state guard of a measurement: everything it could touch is restored bitwise, and ``training_step`` used
as the loss does not log."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

# The bookkeeping attributes a torchmetrics ``Metric`` changes in ``update``/``forward``/``compute`` besides its
# registered states (``_defaults``): torchmetrics 1.x, metric.py.
_METRIC_ATTRIBUTES = (
    "_update_count",
    "_computed",
    "_forward_cache",
    "_is_synced",
    "_cache",
    "_should_unsync",
    "_to_sync",
    "_enable_grad",
    "compute_on_cpu",
)


def _is_metric(module: nn.Module) -> bool:
    # duck-typed so torchmetrics stays optional: a Metric registers its states in `_defaults` and counts updates
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _clone_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)  # list states grow by append; the tensors already in them are not written in place
    return value


class _MetricSnapshot:
    """The states of every torchmetrics ``Metric`` registered under a module, restored bitwise.

    ``training_step`` used as the loss (``loss_fn=None``) runs the user's metric updates at every probe batch (at
    every Hessian-vector product for some backends): without this, an ``Accuracy`` updated there counts the probe
    set many times per measurement. Tensor states are copied back into the same tensor objects (``copy_``), list
    states get their original elements back in the original list object.
    """

    def __init__(self, module: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict[str, tuple[Any, Any]], dict[str, Any]]] = []
        for m in module.modules():
            if not _is_metric(m):
                continue
            states = {name: (getattr(m, name), _clone_state(getattr(m, name))) for name in m._defaults}
            extra = {name: _clone_state(getattr(m, name)) for name in _METRIC_ATTRIBUTES if hasattr(m, name)}
            self.saved.append((m, states, extra))

    def restore(self) -> None:
        for m, states, extra in self.saved:
            for name, (original, copy) in states.items():
                if isinstance(original, Tensor) and original.shape == copy.shape:
                    with torch.no_grad():
                        original.copy_(copy)
                    restored: Any = original
                elif isinstance(original, list):
                    original[:] = copy
                    restored = original
                else:
                    restored = copy
                setattr(m, name, restored)
            for name, value in extra.items():
                setattr(m, name, value)


@contextlib.contextmanager
def model_state_guard(module: nn.Module) -> Iterator[None]:
    """Restore, bitwise, everything a measurement could touch: train/eval flags, ``.grad``, ``requires_grad``,
    buffers, the states of torchmetrics ``Metric`` modules registered under ``module``, and the torch (CPU and
    CUDA), Python and NumPy RNG states.

    Not restored: plain Python attributes and tensors that are neither parameters, buffers nor metric states, which
    a ``training_step`` used as the loss may change (an EMA teacher updated in place, a step counter). Pass
    ``loss_fn`` when ``training_step`` does such things.
    """
    flags = [(m, m.training) for m in module.modules()]
    metrics = _MetricSnapshot(module)
    params = list(module.parameters())
    grads = [p.grad for p in params]
    requires = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_rng = None
    with contextlib.suppress(ImportError):
        import numpy as np

        np_rng = np.random.get_state()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        metrics.restore()
        for p, g, r in zip(params, grads, requires, strict=True):
            p.grad = g
            p.requires_grad_(r)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            import numpy as np

            np.random.set_state(np_rng)


@contextlib.contextmanager
def _logging_suppressed(module: pl.LightningModule) -> Iterator[None]:
    """``training_step`` as a loss function must not log: shadow ``log``/``log_dict`` on the instance."""
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    saved = {name: module.__dict__.get(name) for name in had}
    module.__dict__["log"] = lambda *args, **kwargs: None
    module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                module.__dict__[name] = saved[name]
            else:
                del module.__dict__[name]


__all__ = ["model_state_guard"]
