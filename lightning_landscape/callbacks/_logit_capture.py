"""What LogitMonitor arms on a due step: forward hooks on the output and alignment layers and the attention capture,
accumulating device tensors in a :class:`~lightning_landscape.core.distributed.ReducedState` until the read-back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.core import distributed
from lightning_landscape.core.attention import AttentionCapture
from lightning_landscape.core.logits import softmax_saturated, top_right_singular_vector


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class _Armed:
    """What one due step's capture holds between ``on_train_batch_start`` and ``on_train_batch_end``."""

    def __init__(self, step: int, started: float) -> None:
        self.step = step
        self.seconds = time.perf_counter() - started  # the hook time spent so far (arming)
        #: Seconds the output and alignment hooks spent inside the training forward (no callback hook times them).
        self.forward_seconds = 0.0
        self.capture: AttentionCapture | None = None
        self.handles: list[Any] = []
        self.state = distributed.ReducedState()  # 0-d tensors on the device, each with its reduction

    def add(self, name: str, value: Tensor, op: str) -> None:
        self.state.update(name, value, op)

    def install(
        self,
        pl_module: nn.Module,
        attention: Callable[[str], bool] | None,
        output: tuple[str, nn.Module] | None,
        layers: dict[str, nn.Linear],
        directions: dict[str, Tensor],
        power_iterations: int,
        entropy_samples: int | None,
    ) -> None:
        """Hooks (output, alignment) and the attention capture, writing device tensors into :attr:`state`.

        ``directions``: the alignment layers' warm starts, updated in place with this step's top singular vectors.
        """
        armed = self

        def output_hook(module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
            if not isinstance(result, Tensor) or not result.is_floating_point() or result.dim() == 0:
                return
            started = time.perf_counter()
            with torch.no_grad():
                logits = result.detach()
                wide = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
                finite = torch.isfinite(wide)
                armed.add("output/non_finite", (~finite).sum().to(wide.dtype), "sum")
                log_z = torch.logsumexp(wide.masked_fill(~finite, 0.0), dim=-1)
                armed.add("output/log_z_sum", log_z.sum(), "sum")
                armed.add("output/count", wide.new_tensor(float(log_z.numel())), "sum")
                armed.add("output/max_abs", wide.masked_fill(~finite, 0.0).abs().amax(), "max")
                # softmax collapse in the dtype the loss sees: autocast runs cross-entropy in float32
                autocast = _autocast_on(logits.device.type)
                loss_dtype = torch.float32 if autocast and logits.dtype in (torch.float16, torch.bfloat16) else None
                armed.add("output/saturated", softmax_saturated(logits, loss_dtype).sum().to(wide.dtype), "sum")
            armed.forward_seconds += time.perf_counter() - started

        def alignment_hook(name: str, direction: Tensor):
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                    return
                started = time.perf_counter()
                with torch.no_grad():
                    x = args[0].detach()
                    x = x.reshape(-1, x.shape[-1]).to(direction.dtype)
                    armed.add(f"alignment/{name}/non_finite", (~torch.isfinite(x)).sum().to(x.dtype), "sum")
                    projection = x @ direction
                    armed.add(f"alignment/{name}/positive", (projection > 0).sum().to(x.dtype), "sum")
                    armed.add(f"alignment/{name}/negative", (projection < 0).sum().to(x.dtype), "sum")
                armed.forward_seconds += time.perf_counter() - started

            return hook

        for name, layer in layers.items():
            direction, _ = top_right_singular_vector(layer.weight, directions.get(name), power_iterations)
            directions[name] = direction
            # float64 where the device has it, as the power iteration
            armed.handles.append(layer.register_forward_pre_hook(alignment_hook(name, direction)))
        if output is not None:
            armed.handles.append(output[1].register_forward_hook(output_hook))
        if attention is not None:
            names = {m: n for n, m in pl_module.named_modules()}
            armed.capture = AttentionCapture(names, attention, entropy_samples).start()

    def seconds_in_forward(self) -> float:
        """Seconds of reads made inside the training forward (hooks and attention capture): no callback hook's span
        contains them, so a ledger that times the hooks must be told of them."""
        return self.forward_seconds + (self.capture.seconds if self.capture is not None else 0.0)

    def disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.capture is not None and self.capture.active:
            self.capture.stop()
