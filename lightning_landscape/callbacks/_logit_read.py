"""LogitMonitor's read-back: the armed statistics reduced over ranks by name, moved to the host in one transfer,
and turned into the logged metrics (a mixin: the methods use the monitor's state and alert rules)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape.callbacks._logit_capture import _Armed
from lightning_landscape.core import distributed
from lightning_landscape.core.attention import looks_like_attention
from lightning_landscape.core.logits import majority_sign_fraction


class _LogitReadout:
    """Reading one armed step back (mixed into :class:`~lightning_landscape.callbacks.logits.LogitMonitor`)."""

    def _declared(self, armed: _Armed) -> dict[str, tuple[Tensor, str]]:
        values = armed.state.declared()
        if armed.capture is not None:
            for name, s in armed.capture.sums.items():
                values[f"attention/{name}/max"] = (s.maximum, "max")
                values[f"attention/{name}/entropy_sum"] = (s.entropy_sum, "sum")
                values[f"attention/{name}/rows"] = (s.rows, "sum")
                values[f"attention/{name}/non_finite"] = (s.non_finite, "sum")
        return values

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, armed: _Armed) -> dict[str, float]:
        values = self._declared(armed)
        if trainer.world_size > 1:
            reduced = distributed.all_reduce_named(values)
        else:
            reduced = {name: tensor for name, (tensor, _) in values.items()}
        if armed.capture is not None:
            self._check_attention_captured(pl_module, reduced)
        names = sorted(reduced)
        if not any(n.startswith(("attention/", "alignment/")) for n in names) and "output/count" not in names:
            self._nothing_to_watch()  # e.g. a convolutional net without a Linear head: say so once, keep training
            return {}
        device = reduced[names[0]].device
        wide = torch.float32 if device.type == "mps" else torch.float64
        # the one device-to-host transfer of the measurement
        host = torch.stack([reduced[n].reshape(()).to(wide) for n in names]).tolist()
        read = dict(zip(names, host, strict=True))
        return self._metrics(trainer, read, armed.step)

    def _check_attention_captured(self, pl_module: pl.LightningModule, reduced: dict[str, Tensor]) -> None:
        """After the reduction, so that every rank decides alike (a rank whose batch skipped attention does not
        stop the others' capture): warn when nothing was captured on a model with attention-like modules, and on
        the fit's first armed step stop arming the capture when nothing was captured and the model has none."""
        first, self._attention_checked = not self._attention_checked, True
        if any(name.startswith("attention/") for name in reduced):
            return
        if not first and "no-attention-captured" in self._warned:
            return  # decided and said: no need to walk the modules again every armed step
        suspects = looks_like_attention(pl_module)
        if first and not suspects and self.attention is True:
            # no attention call in the training step and no module that looks like attention: the capture's
            # dispatch of every torch call would cost the rest of the fit for nothing
            self._attention_absent = True
        if suspects:
            self._warn_once(
                "no-attention-captured",
                f"LogitMonitor captured no attention call although the model has attention-like modules "
                f"({suspects[:3]}{'...' if len(suspects) > 3 else ''}): its attention does not go through "
                "F.scaled_dot_product_attention, a softmax over (batch, heads, queries, keys) or "
                "nn.MultiheadAttention (a custom kernel such as flash_attn's?), or `attention`="
                f"{self.attention!r} selects none of the calling modules. No attention keys are logged, so "
                "`attention_logit_growth` cannot fire.",
            )

    def _metrics(self, trainer: pl.Trainer, read: dict[str, float], step: int) -> dict[str, float]:
        bad = sorted({n.rsplit("/", 1)[0] for n, v in read.items() if n.endswith("/non_finite") and v > 0})
        if bad:
            raise FloatingPointError(f"Non-finite values in {bad}.")
        p = f"{self.prefix}/{self.group}"
        metrics: dict[str, float] = {}
        attention = sorted(
            {n[len("attention/") : -len("/max")] for n in read if n.startswith("attention/") and n.endswith("/max")}
        )
        maxima = []
        for name in attention:
            rows = read[f"attention/{name}/rows"]
            if not rows:
                continue  # every query row was masked
            maximum = read[f"attention/{name}/max"]
            maxima.append(maximum)
            metrics[f"{p}/attention/{name}/max"] = maximum
            metrics[f"{p}/attention/{name}/entropy"] = read[f"attention/{name}/entropy_sum"] / rows
        if maxima:
            metrics[f"{p}/attention/max"] = max(maxima)
        count = read.get("output/count", 0.0)
        if count:
            log_z = read["output/log_z_sum"] / count
            if self._initial_log_partition is None:
                self._initial_log_partition = log_z
            metrics[f"{p}/output/log_partition"] = log_z
            metrics[f"{p}/output/drift"] = log_z - self._initial_log_partition
            metrics[f"{p}/output/max_abs"] = read["output/max_abs"]
            metrics[f"{p}/output/softmax_collapse"] = read["output/saturated"] / count
        fractions = {}
        for name in sorted({n[len("alignment/") : -len("/positive")] for n in read if n.endswith("/positive")}):
            fraction = majority_sign_fraction(
                int(read[f"alignment/{name}/positive"]), int(read[f"alignment/{name}/negative"])
            )
            if not math.isnan(fraction):
                fractions[name] = fraction
        for name, fraction in fractions.items():
            self._initial_fraction.setdefault(name, fraction)
            metrics[f"{p}/alignment/{name}/sign_fraction"] = fraction
        if fractions:
            metrics[f"{p}/alignment/max_sign_fraction"] = max(fractions.values())
        self._check_alerts(trainer, metrics, fractions, step)
        return metrics
