"""ModeConnectivityMonitor: linear-mode-connectivity barriers between consecutive snapshots of the weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_callable, check_float, check_int
from lightning_landscape.core.alerts import Alert, ConsecutiveAboveRule
from lightning_landscape.core.barrier import (
    barriers_from_curve,
    hermite_midpoint_predictor,
    hessian_midpoint_predictor,
    interpolation_barrier,
)
from lightning_landscape.core.hvp import HessianOperator, operator_mode
from lightning_landscape.core.interpolation import (
    batchnorm_buffer_keys,
    check_bn_policy,
    interpolate_state,
    loaded_state,
    probe_set_totals,
    recompute_batchnorm,
)
from lightning_landscape.core.params import flatten, top_level_blocks


class ModeConnectivityMonitor(LandscapeCallback):
    """Loss barrier on the straight line between the previous snapshot of the weights and the current ones.

    Every ``every_n_steps`` steps the weights are snapshotted (on CPU); from the second snapshot on, the loss on the
    probe set is evaluated along ``theta(alpha) = (1 - alpha) previous + alpha current`` on an ``num_alphas``-point
    grid (exactly 0 and 1), refined around the peak with ``refine_steps`` bisections. The primary number is the chord
    barrier ``max f(alpha) - ((1 - alpha) f(0) + alpha f(1))`` (consecutive snapshots have different losses, which
    inflates the mean barrier of Frankle et al.). Losses are weighted by batch size and, under DDP, summed across
    ranks; BatchNorm statistics follow ``bn_policy`` (see :mod:`lightning_landscape.core.interpolation`).

    Logged metrics (``p`` = ``prefix``):
        - ``p/lmc/barrier`` (chord, primary), ``p/lmc/barrier_mean``, ``p/lmc/barrier_midpoint``,
          ``p/lmc/barrier_alpha`` (where the chord barrier is attained).
        - ``p/lmc/loss_start``, ``p/lmc/loss_end``: the endpoint losses under the same policy.
        - ``p/lmc/barrier/{layer}``: chord barrier interpolating one top-level block at a time with the rest at the
          current weights (Adilova et al. 2024), when ``layerwise=True``.
        - ``p/lmc/predicted_barrier_hermite``, ``p/lmc/predicted_barrier_hessian``: cheap midpoint predictors, when
          ``predictors=True``.
        - ``p/lmc/error_barrier``, ``p/lmc/error_barrier_mean``: the same barriers on the error rate, when
          ``error_fn`` is given.
        - ``p/lmc/evaluations``: loss evaluations this measurement cost; ``p/lmc/curve``: the curve as an image
          (``curve_image=True``, the default here; needs matplotlib; ``LandscapeMonitor`` turns it off).

    Alert ``barrier_rise``: the chord barrier (divided by the mean endpoint loss when ``relative=True``) above
    ``barrier_threshold`` for ``barrier_patience`` consecutive evaluations.

    Cost per evaluation: ``(num_alphas + refine_steps)`` passes over the probe set (twice with ``"recompute"``), times
    ``1 + number of blocks`` with ``layerwise=True``.

    Args:
        num_alphas: grid size (>= 3 so the interior is seen).
        bn_policy: ``"recompute"``, ``"interpolate"`` or ``"keep"``.
        layerwise: also log the barrier of each top-level block.
        refine_steps: bisection steps around the peak.
        predictors: also log the Hermite and Hessian midpoint predictors (2 gradients and 1 HVP).
        barrier_threshold, barrier_patience, relative: the ``barrier_rise`` rule.
        error_fn: ``error_fn(pl_module, batch)`` -> the batch's error rate in [0, 1] (e.g. 1 - accuracy), for the
            error barriers Frankle et al. report; one more forward pass per batch and alpha.
        batch_size_fn: ``batch -> int`` for the size weights of the probe batches (default: the leading dimension
            of the first tensor in the batch).
        curve_image: draw the curve as a TensorBoard image at every evaluation. Drawing a matplotlib figure takes
            60-90 ms of CPU whatever the model (measured), 20-50 training steps of a millisecond model: most of an
            evaluation's cost there. ``LandscapeMonitor`` passes False (its budget goes to the curvature points);
            the scalars carry the same numbers.
        **kwargs: the shared arguments of :class:`~lightning_landscape.callbacks._base.LandscapeCallback`.

    References: Frankle et al. 2020 (ICML); Entezari et al. 2022 (ICLR); Adilova et al. 2024 (ICLR); Singh et al.
    2024 ("Landscaping Linear Mode Connectivity").
    """

    group = "lmc"
    needs_full_parameters = True
    # budget mode's estimate of an interpolation before one has run: 17-33 training steps on the reference workloads;
    # pessimistic on purpose, since the budget holds only when the first estimate is not below the real cost
    first_cost_steps = 40.0

    def __init__(
        self,
        num_alphas: int = 11,
        bn_policy: str = "recompute",
        layerwise: bool = False,
        *,
        refine_steps: int = 3,
        predictors: bool = False,
        barrier_threshold: float = 0.1,
        barrier_patience: int = 2,
        relative: bool = False,
        error_fn: Callable[[pl.LightningModule, Any], Any] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        curve_image: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.curve_image = check_bool("curve_image", curve_image)
        if error_fn is not None:
            check_callable("error_fn", error_fn, 2, "(pl_module, batch) -> error rate", optional=True)
        self.error_fn = error_fn
        if batch_size_fn is not None:
            check_callable("batch_size_fn", batch_size_fn, 1, "batch -> int", optional=True)
        self.batch_size_fn = batch_size_fn
        self.num_alphas = check_int("num_alphas", num_alphas, minimum=3)
        self.bn_policy = check_bn_policy(bn_policy)
        self.layerwise = check_bool("layerwise", layerwise)
        self.refine_steps = check_int("refine_steps", refine_steps, minimum=0)
        self.predictors = check_bool("predictors", predictors)
        self.relative = check_bool("relative", relative)
        self.barrier_rule = ConsecutiveAboveRule(
            check_float("barrier_threshold", barrier_threshold, minimum=0.0),
            check_int("barrier_patience", barrier_patience, minimum=1),
        )
        self._previous: dict[str, Tensor] | None = None
        self._previous_step = -1

    def _state_key_fields(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "bn_policy": self.bn_policy}

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "previous": self._previous,
            "previous_step": self._previous_step,
            "rule": self.barrier_rule.state_dict(),
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")
        self._previous_step = int(state.get("previous_step", -1))
        self.barrier_rule.load_state_dict(state.get("rule", {}))

    # ---------------------------------------------------------------------------------------------- measure
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        previous, self._previous, previous_step = self._previous, current, self._previous_step
        self._previous_step = step
        if previous is None:
            self._cost_is_typical = False  # a copy of the weights says nothing about an interpolation's cost
            return {}  # the first snapshot: nothing to connect yet
        device = pl_module.device
        start = {k: v.to(device) for k, v in previous.items()}
        end = {k: v.to(device) for k, v in current.items()}
        loss_fn = self.resolve_loss_fn(pl_module)
        bn_keys = batchnorm_buffer_keys(pl_module)
        metrics: dict[str, float] = {}
        evaluations = 0

        errors: dict[float, float] = {}

        def loss_at(alpha: float) -> float:
            state = interpolate_state(start, end, alpha)
            if self.bn_policy == "keep":
                state.update({k: start[k].clone() for k in bn_keys})
            loss, errors[alpha] = self._loss(trainer, pl_module, loss_fn, batches, state)
            return loss

        full = interpolation_barrier(loss_at, self.num_alphas, self.refine_steps)
        evaluations += full.num_evaluations
        p = self.prefix
        metrics.update(
            {
                f"{p}/lmc/barrier": full.chord,
                f"{p}/lmc/barrier_mean": full.mean,
                f"{p}/lmc/barrier_midpoint": full.midpoint,
                f"{p}/lmc/barrier_alpha": full.chord_alpha,
                f"{p}/lmc/loss_start": full.losses[0],
                f"{p}/lmc/loss_end": full.losses[-1],
            }
        )
        if self.error_fn is not None:
            # Frankle et al. report error barriers; same curve, same alphas, errors in [0, 1]
            error_chord, _, error_mean, _ = barriers_from_curve(full.alphas, [errors[a] for a in full.alphas])
            metrics[f"{p}/lmc/error_barrier"] = error_chord
            metrics[f"{p}/lmc/error_barrier_mean"] = error_mean
        if self.layerwise:
            param_names = [n for n, _ in pl_module.named_parameters()]
            for block in top_level_blocks(param_names):
                # one block moves from previous to current, every other entry stays at the current weights
                keys = {k for k in start if k == block or k.startswith(block + ".")}

                def block_loss_at(alpha: float, keys: set[str] = keys) -> float:
                    state = interpolate_state(end, start, 1.0 - alpha, keys=keys)
                    return self._loss(trainer, pl_module, loss_fn, batches, state)[0]

                layer = interpolation_barrier(block_loss_at, self.num_alphas, self.refine_steps)
                evaluations += layer.num_evaluations
                metrics[f"{p}/lmc/barrier/{block}"] = layer.chord
        if self.predictors:
            metrics.update(self._predictors(trainer, pl_module, loss_fn, batches, start, end))
        metrics[f"{p}/lmc/evaluations"] = float(evaluations)
        if self.curve_image and not tb.log_curve_figure(
            trainer, f"{p}/lmc/curve", full.alphas, full.losses, step, "alpha", "loss"
        ):
            self._warn_once(
                "no-matplotlib",
                "ModeConnectivityMonitor: matplotlib is not installed, so the interpolation curve is not drawn "
                "(scalars are logged). `pip install matplotlib` to get the figure.",
            )
        self._check_alerts(trainer, metrics, step, previous_step)
        return metrics

    def _loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: Any, batches: list[Any], state: dict
    ) -> tuple[float, float]:
        """Size-weighted mean loss (and error, NaN without ``error_fn``) over the probe set (over every rank) at
        ``state``, under the BN policy."""
        with loaded_state(pl_module, state):
            if self.bn_policy == "recompute":
                recompute_batchnorm(pl_module, batches, loss_fn)
                if trainer.world_size > 1:  # every rank re-estimated on its own slice
                    distributed.average_batchnorm_statistics(pl_module)
            with operator_mode(pl_module, self.mode):
                totals = probe_set_totals(
                    pl_module,
                    loss_fn,
                    batches,
                    seed=self.seed,
                    batch_size_fn=self.batch_size_fn,
                    error_fn=self.error_fn,
                )
        if trainer.world_size > 1:
            totals = distributed.all_reduce_sum(totals)
        value = float(totals[0] / totals[2])
        if not math.isfinite(value):
            raise FloatingPointError(f"The probe-set loss along the interpolation is not finite ({value}).")
        return value, float(totals[1] / totals[2]) if self.error_fn is not None else math.nan

    def _predictors(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loss_fn: Any,
        batches: list[Any],
        start: dict,
        end: dict,
    ) -> dict[str, float]:
        all_reduce = distributed.all_reduce_sum if trainer.world_size > 1 else None
        names = [n for n, q in pl_module.named_parameters() if q.requires_grad]
        direction = flatten(end[n] - start[n] for n in names)
        gradients = []
        for state in (start, end):
            with loaded_state(pl_module, state), operator_mode(pl_module, self.mode):
                op = HessianOperator(
                    pl_module, loss_fn, batches, seed=self.seed, all_reduce=all_reduce, batch_size_fn=self.batch_size_fn
                )
                gradients.append(op.loss_and_gradient()[1])
        midpoint = interpolate_state(start, end, 0.5)
        with (
            loaded_state(pl_module, midpoint),
            operator_mode(pl_module, self.mode),
            HessianOperator(
                pl_module, loss_fn, batches, seed=self.seed, all_reduce=all_reduce, batch_size_fn=self.batch_size_fn
            ) as op,
        ):
            hv = op @ direction
        p = self.prefix
        return {
            f"{p}/lmc/predicted_barrier_hermite": hermite_midpoint_predictor(direction, gradients[0], gradients[1]),
            f"{p}/lmc/predicted_barrier_hessian": hessian_midpoint_predictor(direction, hv),
        }

    def _check_alerts(self, trainer: pl.Trainer, metrics: dict[str, float], step: int, previous_step: int) -> None:
        p = self.prefix
        barrier = metrics[f"{p}/lmc/barrier"]
        value = barrier
        if self.relative:
            scale = 0.5 * (metrics[f"{p}/lmc/loss_start"] + metrics[f"{p}/lmc/loss_end"])
            value = barrier / max(scale, 1e-8)  # a floor: the relative barrier must not explode as losses reach 0
        if self.barrier_rule.update(value):
            what = "relative chord barrier" if self.relative else "chord barrier"
            self.emit_alert(
                trainer,
                Alert(
                    step=step,
                    kind="barrier_rise",
                    source=type(self).__name__,
                    metric=f"{p}/lmc/barrier",
                    value=value,
                    threshold=self.barrier_rule.threshold,
                    message=(
                        f"{what} {value:.4g} between the weights of step {previous_step} and step {step} has been "
                        f"above {self.barrier_rule.threshold:g} for {self.barrier_rule.patience} evaluations: the "
                        "run is crossing a ridge between snapshots (instability in the sense of Frankle et al.)."
                    ),
                ),
            )
