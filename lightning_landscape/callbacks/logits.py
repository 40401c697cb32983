"""LogitMonitor: attention-logit growth, output-logit divergence and spectral alignment, from forward passes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_float, check_int
from lightning_landscape.core.alerts import Alert
from lightning_landscape.core.hvp import operator_mode, seeded_rng
from lightning_landscape.core.logits import LogitProbe, LogitStatistics, top_right_singular_vector


def _select(option: Any, name: str) -> bool | str | list[str]:
    """``True``/``False``, a regex, or a list of module names."""
    if isinstance(option, bool):
        return option
    if isinstance(option, str):
        try:
            re.compile(option)
        except re.error as err:
            raise ValueError(
                f"`{name}` must be a bool, a valid regular expression or a list of names, got {option!r}."
            ) from err
        return option
    if isinstance(option, Sequence) and option and all(isinstance(o, str) for o in option):
        return list(option)
    raise TypeError(f"`{name}` must be a bool, a regular expression or a list of module names, got {option!r}.")


def _pick(named: list[tuple[str, nn.Module]], option: bool | str | list[str], name: str) -> list[tuple[str, Any]]:
    if option is False:
        return []
    if option is True:
        return named
    if isinstance(option, str):
        return [(n, m) for n, m in named if re.search(option, n)]
    chosen = [(n, m) for n, m in named if n in set(option)]
    missing = set(option) - {n for n, _ in chosen}
    if missing:
        raise ValueError(f"`{name}` names {sorted(missing)}, which are not modules of the required type in the model.")
    return chosen


class LogitMonitor(LandscapeCallback):
    """Forward-pass early warnings: attention logits, the output log-partition, and spectral alignment.

    Every ``every_n_steps`` (default 10) the probe set runs through the loss once, without a backward pass, with
    hooks that read (never change) the inputs and outputs of the chosen modules; the hooks are removed afterwards.
    Gradient recording stays on during that pass because ``nn.TransformerEncoderLayer`` bypasses its attention
    module altogether (a fused fast path) when it is off.

    Logged metrics (``p`` = ``prefix``; ``name`` = module name):
        - ``p/logits/attention/max``: the largest pre-softmax attention logit ``q.k/sqrt(d_head)`` of any head of any
          ``nn.MultiheadAttention`` (Wortsman et al. 2023: its growth precedes divergence; qk-layernorm stops it),
          and ``p/logits/attention/{name}/max``, ``p/logits/attention/{name}/entropy`` (mean softmax entropy per
          query, nats; it collapses as logits grow).
        - ``p/logits/output/log_partition``: mean ``logsumexp`` of the output layer's logits (``output_module``) and
          ``p/logits/output/drift``, its change since the first measurement; ``p/logits/output/max_abs``.
        - ``p/logits/alignment/{name}/sign_fraction``: spectral alignment (Qiu et al. 2025): the majority-sign
          fraction of ``v1 . x`` over the layer's input rows ``x`` (``v1``: the weight's top right singular vector,
          by warm-started power iteration), in [0.5, 1]; and ``p/logits/alignment/max_sign_fraction``.
        - ``p/logits/status``: 1 ok, 0 failed.

    Alerts:
        - ``attention_logit_growth``: the largest attention logit exceeds ``attention_logit_threshold`` (default 30:
          a key 30 above the others takes all but ``e^-30`` of a query's attention). In ``benchmarks/early_warning.py``
          the small character transformer stayed below 9 in 150 steps at a safe learning rate (and below 21 in
          600), and crossed 30 about 30 steps before it diverged at a high one. Larger models have larger logits
          (Wortsman et al. saw 10^3-10^4 before divergence): raise it for them.
        - ``logit_divergence`` (opt-in, ``log_partition_drift`` in nats): ``|drift|`` of the output log-partition
          exceeds it. Off by default: a healthy classifier's log-partition rises by 4-10 nats as it grows confident,
          more than the transformer's pre-divergence drift (2.3-3), so no level separates them.
        - ``alignment_collapse`` (when ``alignment`` is on): a layer's sign fraction reaches ``alignment_threshold``
          when it started below it. Off by default: in our scenarios the fraction also reached 1.0 in stable
          controls (inputs after a ReLU are non-negative, so one sign is natural); see ``benchmarks/RESULTS.md``.

    Cost per measurement: one forward pass over the probe set, the attention logits once more per attention module,
    and a few ``W^T W v`` products per watched linear layer: about a third of a training step per probe batch.

    Args:
        attention: watch ``nn.MultiheadAttention`` modules: ``True`` (all), ``False``, a regex or a list of names.
        output_module: the module whose output are the logits: ``None`` for the last ``nn.Linear`` registered, a
            module name, or ``False`` for none.
        alignment: the ``nn.Linear`` layers for spectral alignment: ``False`` (default), ``True`` (all), a regex or
            names.
        attention_logit_threshold, log_partition_drift, alignment_threshold: the alert thresholds (see above);
            ``log_partition_drift=None`` turns ``logit_divergence`` off.
        power_iterations: most power iterations per layer and measurement (warm-started, usually 2-5 are used).
        **kwargs: the shared arguments of :class:`~lightning_landscape.callbacks._base.LandscapeCallback`.
    """

    group = "logits"
    # the probe forward calls the unwrapped module and power iteration needs whole weights
    needs_full_parameters = True
    # budget mode's first estimate: one forward pass over the probe set
    first_cost_steps = 1.0

    def __init__(
        self,
        attention: bool | str | Sequence[str] = True,
        output_module: str | bool | None = None,
        alignment: bool | str | Sequence[str] = False,
        *,
        attention_logit_threshold: float = 30.0,
        log_partition_drift: float | None = None,
        alignment_threshold: float = 0.99,
        power_iterations: int = 20,
        every_n_steps: int = 10,
        num_probe_batches: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, num_probe_batches=num_probe_batches, **kwargs)
        self.attention = _select(attention, "attention")
        if output_module is not None and not isinstance(output_module, str) and output_module is not False:
            raise TypeError(f"`output_module` must be None, a module name or False, got {output_module!r}.")
        self.output_module = output_module
        self.alignment = _select(alignment, "alignment")
        self.attention_logit_threshold = check_float("attention_logit_threshold", attention_logit_threshold)
        self.log_partition_drift = (
            None
            if log_partition_drift is None
            else check_float("log_partition_drift", log_partition_drift, minimum=0.0, strict_minimum=True)
        )
        self.alignment_threshold = check_float("alignment_threshold", alignment_threshold, minimum=0.5, maximum=1.0)
        self.power_iterations = check_int("power_iterations", power_iterations, minimum=1)
        self._directions: dict[str, Tensor] = {}  # warm starts of the power iterations
        self._initial_log_partition: float | None = None
        self._initial_fraction: dict[str, float] = {}
        self._alert_armed: dict[str, bool] = {}

    def _state_key_fields(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "directions": {name: v.detach().cpu() for name, v in self._directions.items()},
            "initial_log_partition": self._initial_log_partition,
            "initial_fraction": dict(self._initial_fraction),
            "alert_armed": dict(self._alert_armed),
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        self._directions = {name: v.clone() for name, v in state.get("directions", {}).items()}
        initial = state.get("initial_log_partition")
        self._initial_log_partition = None if initial is None else float(initial)
        self._initial_fraction = {k: float(v) for k, v in state.get("initial_fraction", {}).items()}
        self._alert_armed = {k: bool(v) for k, v in state.get("alert_armed", {}).items()}

    # --------------------------------------------------------------------------------------------- modules
    def watched_modules(self, pl_module: nn.Module) -> tuple[dict, tuple[str, nn.Module] | None, dict]:
        """(attention modules, (name, output module) or None, alignment layers), by qualified name.

        Raises:
            ValueError: a module named in ``output_module`` or in a list does not exist.
        """
        named = [(n, m) for n, m in pl_module.named_modules() if n]
        attention_modules = [(n, m) for n, m in named if isinstance(m, nn.MultiheadAttention)]
        # the output projection of nn.MultiheadAttention is a Linear the attention kernel uses without calling it
        inside_attention = {f"{n}.out_proj" for n, _ in attention_modules}
        linears = [(n, m) for n, m in named if isinstance(m, nn.Linear) and n not in inside_attention]
        attention = dict(_pick(attention_modules, self.attention, "attention"))
        alignment = dict(_pick(linears, self.alignment, "alignment"))
        output = None
        if self.output_module is None and linears:
            output = linears[-1]
        elif isinstance(self.output_module, str):
            modules = dict(named)
            if self.output_module not in modules:
                raise ValueError(f"`output_module` must name a module of the model, got {self.output_module!r}.")
            output = (self.output_module, modules[self.output_module])
        return attention, output, alignment

    # ------------------------------------------------------------------------------------------- measure
    def collect(self, pl_module: pl.LightningModule, batches: list[Any], watched: tuple) -> LogitStatistics:
        """Refresh the singular vectors, run the probe set through the loss with the hooks on, return the sums."""
        attention, output, layers = watched
        alignment = {}
        for name, layer in layers.items():
            direction, _ = top_right_singular_vector(layer.weight, self._directions.get(name), self.power_iterations)
            self._directions[name] = direction
            alignment[name] = (layer, direction)
        loss_fn = self.resolve_loss_fn(pl_module)
        with operator_mode(pl_module, self.mode), LogitProbe(attention, output, alignment) as stats:
            for index, batch in enumerate(batches):
                with seeded_rng(pl_module.device, self.seed + index):
                    loss_fn(pl_module, batch)  # graph built (see the class docstring) and dropped at once
        return stats

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        attention, output, layers = self.watched_modules(pl_module)
        if not any((attention, output, layers)):
            # e.g. a convolutional net without a Linear head inside LandscapeMonitor: say so once, keep training
            self._warn_once(
                "nothing-to-watch",
                "LogitMonitor found nothing to watch: no nn.MultiheadAttention (`attention`), no output layer "
                f"(`output_module`={self.output_module!r}) and no nn.Linear (`alignment`={self.alignment!r}); it "
                "logs nothing.",
            )
            return {}
        stats = self.collect(pl_module, batches, (attention, output, layers))
        if trainer.world_size > 1:
            self._all_reduce(stats, pl_module.device)
        if stats.non_finite:
            raise FloatingPointError(f"Non-finite values in {sorted(set(stats.non_finite))}.")
        p = f"{self.prefix}/{self.group}"
        metrics: dict[str, float] = {}
        for name, summary in stats.attention.items():
            metrics[f"{p}/attention/{name}/max"] = summary.maximum
            metrics[f"{p}/attention/{name}/entropy"] = summary.mean_entropy
        if stats.attention:
            metrics[f"{p}/attention/max"] = max(s.maximum for s in stats.attention.values())
        if stats.output is not None and stats.output.count:
            log_z = stats.output.mean_log_partition
            if self._initial_log_partition is None:
                self._initial_log_partition = log_z
            metrics[f"{p}/output/log_partition"] = log_z
            metrics[f"{p}/output/drift"] = log_z - self._initial_log_partition
            metrics[f"{p}/output/max_abs"] = stats.output.max_abs_logit
        fractions = {name: s.fraction for name, s in stats.alignment.items() if not math.isnan(s.fraction)}
        for name, fraction in fractions.items():
            self._initial_fraction.setdefault(name, fraction)
            metrics[f"{p}/alignment/{name}/sign_fraction"] = fraction
        if fractions:
            metrics[f"{p}/alignment/max_sign_fraction"] = max(fractions.values())
        self._check_alerts(trainer, metrics, fractions, step)
        return metrics

    def _all_reduce(self, stats: LogitStatistics, device: torch.device) -> None:
        # Every rank watches the same modules, and every module sees a probe batch on every rank. Two collectives:
        # one sum (entropy sums, row and sign counts, log Z sums) and one max (logit maxima).
        attention = sorted(stats.attention.items())
        alignment = sorted(stats.alignment.items())
        output = stats.output
        sums = [v for _, s in attention for v in (s.entropy_sum, s.rows)]
        sums += [v for _, s in alignment for v in (s.positive, s.negative)]
        maxima = [s.maximum for _, s in attention]
        if output is not None:
            sums += [output.log_z_sum, output.count]
            maxima.append(output.max_abs_logit)
        sums.append(float(len(stats.non_finite)))
        total = distributed.all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device)).tolist()
        peak = distributed.all_reduce_max(torch.tensor([*maxima, 0.0], dtype=torch.float64, device=device)).tolist()
        offset = 0
        for index, (_, summary) in enumerate(attention):
            summary.entropy_sum, summary.rows = total[offset], int(total[offset + 1])
            summary.maximum = peak[index]
            offset += 2
        for _, summary in alignment:
            summary.positive, summary.negative = int(total[offset]), int(total[offset + 1])
            offset += 2
        if output is not None:
            output.log_z_sum, output.count = total[offset], int(total[offset + 1])
            output.max_abs_logit = peak[len(attention)]
        if total[-1] and not stats.non_finite:
            stats.non_finite.append("another rank's activations")

    # --------------------------------------------------------------------------------------------- alerts
    def _fires(self, kind: str, condition: bool) -> bool:
        """Edge-triggered: an alert fires when its condition becomes true, and re-arms when it turns false."""
        armed = self._alert_armed.get(kind, True)
        self._alert_armed[kind] = not condition
        return condition and armed

    def _alert(
        self, trainer: pl.Trainer, step: int, kind: str, metric: str, value: float, threshold: float, message: str
    ) -> None:
        self.emit_alert(trainer, Alert(step, kind, type(self).__name__, metric, value, threshold, message))

    def _check_alerts(
        self, trainer: pl.Trainer, metrics: dict[str, float], fractions: dict[str, float], step: int
    ) -> None:
        p = f"{self.prefix}/{self.group}"
        attention_max = metrics.get(f"{p}/attention/max")
        limit = self.attention_logit_threshold
        if attention_max is not None and self._fires("attention_logit_growth", attention_max > limit):
            self._alert(
                trainer,
                step,
                "attention_logit_growth",
                f"{p}/attention/max",
                attention_max,
                limit,
                f"The largest attention logit reached {attention_max:.3g} (> {limit:g}): attention is saturating "
                "onto single keys, the precursor of divergence in Wortsman et al. 2023. Lower the learning rate or "
                "add qk-layernorm.",
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
