"""Twice-differentiable attention, and eager execution of compiled code, for curvature measurements.

PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, and the fused CPU kernel) have no
double backward: a Hessian-vector product through ``nn.MultiheadAttention`` or ``F.scaled_dot_product_attention``
fails with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The
math kernel is plain differentiable ops, so inside a measurement we select it. The function computed is the same
(the kernels differ only in rounding); the flags are restored on exit, so training keeps its fast kernels.

Code compiled with ``torch.compile`` has the same problem one level up: aot_autograd's compiled backward has no
double backward ("compiled with non-empty donated buffers which requires create_graph=False"). Inside the block
``torch.compiler.set_stance("force_eager")`` runs compiled modules and functions as their original Python code:
nothing is compiled or recompiled there, the compiled graphs and their guards are left as they are, and training
outside the block runs the same compiled code as without a monitor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Inside the block: scaled-dot-product attention uses the math kernel (no-op on torch < 2.3) and compiled code
    runs eagerly (``torch.compiler.set_stance("force_eager")``, no-op on torch < 2.6)."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3: no selector; the CPU math path is the default there
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        set_stance = getattr(getattr(__import__("torch"), "compiler", None), "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        yield


__all__ = ["differentiable_attention"]
