"""Twice-differentiable attention for curvature measurements.

PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, and the fused CPU kernel) have no
double backward: a Hessian-vector product through ``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``
fails with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The
math kernel is plain differentiable ops, so inside a measurement we select it. The function computed is the same
(the kernels differ only in rounding); the flags are restored on exit, so training keeps its fast kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Restrict scaled-dot-product attention to the math kernel inside the block (no-op on torch < 2.3)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no selector; the CPU math path is the default there
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


__all__ = ["differentiable_attention"]
