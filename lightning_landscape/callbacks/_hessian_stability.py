"""The edge-of-stability half of HessianMonitor: the optimizer's threshold, the preconditioned sharpness, alerts."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.hvp import DiagonalScaledOperator, HessianOperator
from lightning_landscape.core.stability import (
    StabilityThreshold,
    stability_scale,
    stability_shift,
    stability_threshold,
)


class _EdgeOfStability:
    """Mixin of :class:`~lightning_landscape.callbacks.hessian.HessianMonitor` (see its docstring for the rules):
    uses its ``_lanczos``, ``key``, ``emit_alert``, ``_warn_once``, rules and ``_shift``/``_growth_key`` state."""

    _shift: Tensor | None
    _growth_key: str
    _adaptive: bool
    prefix: str

    def _stability(self, trainer: pl.Trainer, params: dict) -> tuple[StabilityThreshold, Tensor | None] | None:
        """The optimizer's threshold and the diagonal ``D`` of the operator ``D H D`` it applies to (``None``:
        ``H`` itself; a preconditioned threshold with ``D = None`` has no preconditioner yet). ``None`` when no
        optimizer has a known threshold."""
        for optimizer in trainer.optimizers:
            threshold = stability_threshold(optimizer, params)
            if threshold is not None:
                scale = stability_scale(optimizer, params, threshold)
                # coupled weight decay adds W D^2 to the scaled operator (SGD with one lr and one wd: in the
                # threshold instead); kept on the instance so the (threshold, D) pair keeps its shape
                self._shift = stability_shift(optimizer, params, scale)
                return threshold, scale
        self._warn_once(
            "no-eos",
            "HessianMonitor: eos_ratio is logged for SGD, Adam and AdamW only (groups sharing their momentum "
            f"settings); the optimizer in use is {[type(o).__name__ for o in trainer.optimizers]}.",
        )
        return None

    def _edge_of_stability(
        self,
        op: HessianOperator,
        stability: tuple[StabilityThreshold, Tensor | None],
        sharpness: float | None,
        generator: torch.Generator,
    ) -> dict[str, float]:
        threshold, scale = stability
        metrics = {self.key("stability_threshold"): threshold.threshold}
        if threshold.preconditioned:
            if scale is None:
                return {}  # before Adam's first step there is no second-moment estimate
            scaled = DiagonalScaledOperator(op, scale, self._shift)
            value = float(self._lanczos(scaled, "precond", 1, False, generator).eigenvalues[0])
            metrics[self.key("preconditioned_sharpness")] = value
        else:
            value = float(sharpness)
        ratio = value / threshold.threshold
        metrics[self.key("eos_sharpness")] = value
        metrics[self.key("eos_ratio")] = ratio
        metrics[self.key("log10_eos_ratio")] = math.log10(ratio) if ratio > 0 else -math.inf
        return metrics

    def _check_alerts(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        source = type(self).__name__
        ratio = metrics.get(self.key("eos_ratio"))
        # Adam trains at eos_ratio ~1 as its normal regime (Cohen et al. 2022) and healthy language models peak
        # near 1.7 early on (notes: curvature.md), so under Adam both alerts also need the ratio above the peak.
        peak = self.adaptive_eos_peak if self._adaptive else None
        if ratio is not None and self.eos_rule.update(ratio, peak):
            self.emit_alert(
                trainer,
                Alert(
                    step=step,
                    kind="edge_of_stability",
                    source=source,
                    metric=self.key("eos_ratio"),
                    value=ratio,
                    threshold=self.eos_rule.threshold,
                    message=(
                        f"eos_ratio {ratio:.3g} has been above {self.eos_rule.threshold:g} for "
                        f"{self.eos_rule.patience} measurements"
                        + (f" (and above {peak:g}, Adam's margin)" if peak is not None else "")
                        + ": the curvature exceeds what the optimizer's step "
                        "size can follow stably (edge of stability); loss spikes or divergence may follow. "
                        "Consider a lower learning rate or warm-up."
                    ),
                ),
            )
        # The growth rule follows the quantity the threshold applies to (the preconditioned sharpness under Adam),
        # one series, so a raw value every `raw_sharpness_every` measurements never reads as a jump.
        watched = self._growth_key
        sharpness = metrics.get(watched)
        if sharpness is None:
            return
        threshold = self.growth_rule.threshold
        min_ratio = self.growth_min_eos_ratio if peak is None else max(self.growth_min_eos_ratio, peak)
        near_threshold = ratio is None or ratio >= min_ratio
        if self.growth_rule.update(sharpness) and near_threshold:
            self.emit_alert(
                trainer,
                Alert(
                    step=step,
                    kind="sharpness_growth",
                    source=source,
                    metric=watched,
                    value=sharpness,
                    threshold=threshold,
                    message=(
                        f"sharpness jumped to {sharpness:.4g} from {threshold / (1 + self.growth_rule.jump):.4g} "
                        f"(more than {self.growth_rule.jump:.0%} between measurements)."
                    ),
                ),
            )
