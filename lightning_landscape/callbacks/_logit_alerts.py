"""LogitMonitor's alert rules: attention-logit growth against each module's baseline, log-partition drift, softmax
collapse and alignment collapse, each edge-triggered (a mixin: the rules read the monitor's thresholds and state)."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_landscape.core.alerts import Alert


class _LogitAlerts:
    """The alert rules (mixed into :class:`~lightning_landscape.callbacks.logits.LogitMonitor`)."""

    def _fires(self, kind: str, condition: bool) -> bool:
        """Edge-triggered: an alert fires when its condition becomes true, and re-arms when it turns false."""
        armed = self._alert_armed.get(kind, True)
        self._alert_armed[kind] = not condition
        return condition and armed

    def _alert(
        self, trainer: pl.Trainer, step: int, kind: str, metric: str, value: float, threshold: float, message: str
    ) -> None:
        self.emit_alert(trainer, Alert(step, kind, type(self).__name__, metric, value, threshold, message))

    def _attention_growth(self, metrics: dict[str, float]) -> dict[str, tuple[float, float]]:
        """``{module: (largest logit, limit)}`` for the modules over their limit; records first-seen baselines.

        The limit is ``attention_logit_threshold``, raised to ``attention_growth_factor`` times the module's
        baseline (its largest logit at its first measurement) when that is higher: a model whose logits start large
        (Lightning's demo transformer: ~90 at initialisation, post-LN with embeddings scaled by sqrt(d)) is judged
        against its own start, a small-init model (nanoGPT: ~0.1) against the absolute level.
        """
        prefix, suffix = f"{self.prefix}/{self.group}/attention/", "/max"
        growing = {}
        for key, value in metrics.items():
            name = key[len(prefix) : -len(suffix)]
            if not (key.startswith(prefix) and key.endswith(suffix)) or not name:
                continue  # not a module's maximum (the overall `attention/max` has an empty name)
            baseline = self._attention_baseline.setdefault(name, value)
            limit = self.attention_logit_threshold
            if self.attention_growth_factor is not None:
                limit = max(limit, self.attention_growth_factor * baseline)
            if value > limit:
                growing[name] = (value, limit)
        return growing

    def _check_alerts(
        self, trainer: pl.Trainer, metrics: dict[str, float], fractions: dict[str, float], step: int
    ) -> None:
        p = f"{self.prefix}/{self.group}"
        growing = self._attention_growth(metrics)
        if self._fires("attention_logit_growth", bool(growing)):
            name, (value, limit) = max(growing.items(), key=lambda item: item[1][0])
            baseline = self._attention_baseline[name]
            self._alert(
                trainer,
                step,
                "attention_logit_growth",
                f"{p}/attention/{name}/max",
                value,
                limit,
                f"The largest attention logit of `{name}` reached {value:.3g} (> {limit:.3g}; it was {baseline:.3g} "
                "at its first measurement): attention is saturating onto single keys, the precursor of divergence "
                "in Wortsman et al. 2023. Lower the learning rate or add qk-layernorm.",
            )
        drift = metrics.get(f"{p}/output/drift")
        limit = self.log_partition_drift
        if drift is not None and limit is not None and self._fires("logit_divergence", abs(drift) > limit):
            self._alert(
                trainer,
                step,
                "logit_divergence",
                f"{p}/output/drift",
                drift,
                limit,
                f"The output log-partition moved by {drift:+.3g} nats since the first measurement (limit "
                f"{limit:g}): the output logits are diverging in magnitude. Lower the learning rate or add a z-loss.",
            )
        saturated = metrics.get(f"{p}/output/softmax_collapse")
        limit = self.softmax_collapse_fraction
        if saturated is not None and limit is not None and self._fires("softmax_collapse", saturated > limit):
            self._alert(
                trainer,
                step,
                "softmax_collapse",
                f"{p}/output/softmax_collapse",
                saturated,
                limit,
                f"{saturated:.1%} of the output rows have a largest softmax probability of exactly 1 in the loss "
                f"dtype (limit {limit:.1%}): the softmax has saturated and their gradient vanished. Lower the "
                "learning rate, add label smoothing or a z-loss.",
            )
        collapsed = {
            name: f
            for name, f in fractions.items()
            if f >= self.alignment_threshold and self._initial_fraction.get(name, 1.0) < self.alignment_threshold
        }
        if self._fires("alignment_collapse", bool(collapsed)):
            name, fraction = max(collapsed.items(), key=lambda item: item[1])
            self._alert(
                trainer,
                step,
                "alignment_collapse",
                f"{p}/alignment/{name}/sign_fraction",
                fraction,
                self.alignment_threshold,
                f"Spectral alignment of `{name}` collapsed: {fraction:.1%} of its inputs project onto the weight's "
                f"top singular direction with one sign (started at {self._initial_fraction[name]:.1%}). Qiu et al. "
                "2025 report this before loss explosions.",
            )
