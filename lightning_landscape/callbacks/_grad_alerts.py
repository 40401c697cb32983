"""GradientSpikeMonitor's scoring: the detectors and rules applied to a step's read values, the metrics logged, and
the alerts (``grad_spike``, ``loss_spike``, ``grad_growth``, ``divergence``, ``non_finite``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl

from lightning_landscape.callbacks._grad_read import _alignment, _scale
from lightning_landscape.callbacks._grad_records import _Read, _Step
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.divergence import DivergenceRule


class _GradAlerts:
    """Mixin of :class:`~lightning_landscape.callbacks.grad_spikes.GradientSpikeMonitor`: scores a record (host
    floats by now), logs its metrics and emits its alerts, in step order."""

    def _score_read(self, trainer: pl.Trainer, record: _Step, read: _Read) -> float | None:
        """Score one optimizer's gradient norm (alerts about it are emitted here: on the CPU, and with ``clip=True``
        everywhere, before the update). Returns the norm to clip to, or ``None``."""
        stream = self._streams[read.stream]
        squares = read.squares
        total = math.sqrt(sum(squares))
        short = record.weight < self.min_batch_fraction
        detector = stream.detector
        clip_to = None
        scaler = self._scaler
        overflow = scaler is not None and not math.isfinite(total)
        if short or overflow:
            z, spike, bad, ratio = 0.0, False, not math.isfinite(total), math.nan
        else:
            level = float(detector.clip_value()) if self.clip else math.nan
            ratio = detector.ratio_float(total)  # against the statistics that judge this norm
            z, spike, bad = detector.update_float(total)
            if self.clip and spike:
                clip_to = level
            # Heavy tails: the z-score measures surprise against the bulk of the recent norms, but one hard example
            # in a small batch makes a healthy norm several times its neighbours (nanoGPT at batch 8: z up to 9.6, see
            # `min_spike_ratio`). An isolated spike alerts only when it is also large; a second spiking read in a row
            # alerts whatever its size. (Non-finite or unscored values neither extend nor break the run.)
            if spike:
                stream.spike_run += 1
                min_ratio = self.min_spike_ratio
                spike = min_ratio is None or stream.spike_run >= 2 or not ratio < min_ratio
            elif not bad and total > 0:
                stream.spike_run = 0
        growing = stream.growth is not None and not short and not overflow and stream.growth.update(z)
        diverging = stream.divergence is not None and not overflow and stream.divergence.update(total, record.weight)
        self.clip_count += int(clip_to is not None)
        read.scored = {"total": total, "z": z, "spike": spike, "overflow": overflow}
        p = self._key_prefix(read.stream)
        step = record.step
        if overflow:
            self.overflow_count += 1
            stream.overflow_run += 1
            # routine: the scaler skips the step and lowers its scale; a long run of skips or a scale below 1 (the
            # gradients overflow unscaled) is not
            collapsed = stream.overflow_run >= self.max_overflow_steps or _scale(scaler) < 1.0
            if collapsed and not stream.bad:
                stream.bad = True
                self._emit(
                    trainer,
                    step,
                    "non_finite",
                    f"{p}/norm",
                    total,
                    float(self.max_overflow_steps),
                    f"the gradient scaler skipped {stream.overflow_run} consecutive steps (scale now "
                    f"{_scale(scaler):.3g}): the gradients are non-finite even as the scale collapses; training "
                    "has diverged (alerted once until a step is not skipped).",
                )
        else:
            if stream.overflow_run:
                stream.overflow_run, stream.bad = 0, False
            if bad and not stream.bad:
                self._non_finite_alert(trainer, step, f"{p}/norm", total, "gradient norm", "norm")
            stream.bad = bad
        if spike:
            self._emit(
                trainer,
                step,
                "grad_spike",
                f"{p}/zscore",
                z,
                self.z_threshold,
                f"gradient norm {total:.4g} ({ratio:.3g}x its running level) is {z:.1f} standard deviations (log "
                "scale) above its running mean"
                f"{' and was clipped' if clip_to is not None else ''}.",
            )
        if growing:
            self._emit(
                trainer,
                step,
                "grad_growth",
                f"{p}/zscore",
                z,
                self.growth_z,
                f"the gradient norm ({total:.4g}) has stayed more than {self.growth_z:g} standard "
                f"deviations (log scale) above its running mean for {self.growth_patience} steps: a sustained "
                "rise, not a one-step spike (for example a learning rate past the edge of stability).",
            )
        if diverging:
            self._divergence_alert(trainer, step, f"{p}/rise", "gradient norm", stream.divergence)
        read.scored["event"] = spike or bad or clip_to is not None
        return clip_to

    def _score_step(self, trainer: pl.Trainer, record: _Step) -> None:
        """Score the step's loss, then log and alert (its gradients are scored already)."""
        step, p = record.step, self.prefix
        loss = math.nan if record.loss is None else float(record.loss)
        loss_z, loss_spike, loss_bad = 0.0, False, False
        if record.loss is not None:
            if record.weight < self.min_batch_fraction:
                loss_bad = not math.isfinite(loss)
            else:
                loss_z, loss_spike, loss_bad = self.loss_detector.update_float(loss)
            if self.loss_divergence is not None and self.loss_divergence.update(loss, record.weight):
                self._divergence_alert(trainer, step, f"{p}/loss/rise", "loss", self.loss_divergence)
        if not (record.logged or record.reads or loss_spike or loss_bad or self._loss_bad):
            return  # most steps: nothing to log and no alert (the rest below would find exactly that)
        events = any(r.scored is not None and r.scored["event"] for r in record.reads) or loss_spike or loss_bad
        metrics: dict[str, float] = {}
        if record.logged or events:
            for read in record.reads:
                scored = read.scored
                if scored.get("overflow"):
                    # a GradScaler overflow: the scaler skipped this update, and its unscaled norm is inf/NaN by
                    # definition; `grad/overflow_steps` counts these steps instead of logging the non-finite norm
                    continue
                key = self._key_prefix(read.stream)
                stream = self._streams[read.stream]
                metrics[f"{key}/norm"] = scored["total"]
                metrics[f"{key}/zscore"] = scored["z"]
                metrics[f"{key}/spike"] = float(scored["spike"])
                squares = read.squares
                for g, members in zip(stream.group_names, stream.group_members, strict=True):
                    metrics[f"{key}/norm/{g}"] = math.sqrt(sum(squares[i] for i in members))
                if read.nlm is not None:
                    metrics[f"{key}/nlm_alignment"] = _alignment(read.nlm, scored["total"])
                if record.logged and stream.divergence is not None and stream.divergence.updates:
                    metrics[f"{key}/level"] = math.exp(stream.divergence.level)
                    if math.isfinite(stream.divergence.rise):
                        metrics[f"{key}/rise"] = stream.divergence.rise
            if self.watch_loss and record.loss is not None:  # (a manual training_step may return nothing)
                metrics[f"{p}/loss/value"] = loss
                metrics[f"{p}/loss/zscore"] = loss_z
                metrics[f"{p}/loss/spike"] = float(loss_spike)
                divergence = self.loss_divergence
                if record.logged and divergence is not None and divergence.updates:
                    metrics[f"{p}/loss/level"] = math.exp(divergence.level)
                    if math.isfinite(divergence.rise):
                        metrics[f"{p}/loss/rise"] = divergence.rise
            if record.update is not None:
                update, size = record.update.tolist()
                metrics[f"{p}/update/norm"] = update
                metrics[f"{p}/update/ratio"] = update / max(size, 1e-30)
            if self.clip:
                metrics[f"{p}/grad/clipped"] = float(self.clip_count)
            if self.overflow_count:
                metrics[f"{p}/grad/overflow_steps"] = float(self.overflow_count)
            if self.budget is not None:
                metrics[f"{p}/grad/stride"] = float(self.stride)
        for read in record.reads:
            if read.scored["spike"]:
                suffix = "" if read.stream == 0 else f"/optimizer_{read.stream}"
                metrics[f"{p}/events/grad_spike{suffix}"] = read.scored["z"]
        if loss_spike:
            metrics[f"{p}/events/loss_spike"] = loss_z
        if metrics:
            self.last_metrics = metrics
            self.log_metrics(trainer, metrics, step)
        if loss_bad and not self._loss_bad:
            self._non_finite_alert(trainer, step, f"{p}/loss/value", loss, "loss", "loss")
        if record.loss is not None:
            self._loss_bad = loss_bad
        if loss_spike:
            self._emit(
                trainer,
                step,
                "loss_spike",
                f"{p}/loss/zscore",
                loss_z,
                self.z_threshold,
                f"loss {loss:.4g} is {loss_z:.1f} standard deviations (log scale) above its running mean.",
            )

    def _divergence_alert(self, trainer: pl.Trainer, step: int, metric: str, what: str, rule: DivergenceRule) -> None:
        self._emit(
            trainer,
            step,
            "divergence",
            metric,
            rule.rise,
            rule.ratio,
            f"the {what}'s slow level ({math.exp(rule.level):.4g}, ~{rule.time_constant:g}-step average) is "
            f"{rule.rise:.2f}x its lowest level of the last {rule.horizon} steps ({math.exp(rule.best):.4g}): "
            "a sustained rise, the run is diverging (for example a learning rate too high).",
        )

    def _non_finite_alert(
        self, trainer: pl.Trainer, step: int, metric: str, value: float, what: str, short: str
    ) -> None:
        """``non_finite`` on entering an excursion of ``what`` (the caller keeps the edge state)."""
        self._emit(
            trainer,
            step,
            "non_finite",
            metric,
            value,
            math.inf,
            f"the {what} is {value} at step {step}: training has diverged or a batch is corrupt (alerted once until "
            f"the {short} is finite again).",
        )

    def _emit(
        self, trainer: pl.Trainer, step: int, kind: str, metric: str, value: float, threshold: float, message: str
    ) -> None:
        self._alert(trainer, Alert(step, kind, type(self).__name__, metric, value, threshold, message))

    def _alert(self, trainer: pl.Trainer, alert: Alert) -> None:
        self._fired = True
        self.emit_alert(trainer, alert)

    def _key_prefix(self, stream: int) -> str:
        return f"{self.prefix}/grad" if stream == 0 else f"{self.prefix}/grad/optimizer_{stream}"
