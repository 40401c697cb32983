"""HessianMonitor's views of its eigenvectors: the update's top-span share, the Hessian-axes surface, HESD criteria.

Kept apart from :mod:`~lightning_landscape.callbacks.hessian` so that the monitor only holds thin hooks; the maths
is in :mod:`~lightning_landscape.core.river` and :mod:`~lightning_landscape.core.surface`.
"""

from __future__ import annotations

import importlib.util
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._schedule import is_logging_step
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_choice, check_int, check_optional_float
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.interpolation import has_batchnorm, probe_set_totals, recompute_batchnorm
from lightning_landscape.core.lanczos import lanczos
from lightning_landscape.core.params import select_parameters
from lightning_landscape.core.river import UpdateSnapshot
from lightning_landscape.core.surface import Surface, hesd_criteria, hessian_plane

if TYPE_CHECKING:
    from lightning_landscape.callbacks.hessian import HessianMonitor

SURFACE_BN_POLICIES = ("recompute", "keep")
#: Most update_top_fraction values kept in ``HessianViews.update_fractions`` (the logger has them all).
HISTORY = 10_000


class HessianViews:
    """The state and logic behind ``update_top_fraction``, ``surface`` and the HESD criteria of HessianMonitor.

    Validates its arguments (named as HessianMonitor's): see HessianMonitor's docstring for their meaning.
    """

    def __init__(
        self,
        *,
        update_top_fraction: bool = False,
        surface: bool = False,
        surface_every: int = 10,
        surface_grid: int = 9,
        surface_radius: float | None = None,
        surface_bn_policy: str = "recompute",
    ) -> None:
        self.update_top_fraction = check_bool("update_top_fraction", update_top_fraction)
        self.surface = check_bool("surface", surface)
        self.surface_every = check_int("surface_every", surface_every, minimum=1)
        self.surface_grid = check_int("surface_grid", surface_grid, minimum=3)
        if self.surface_grid % 2 == 0:
            raise ValueError(f"`surface_grid` must be odd (theta itself is the centre point), got {surface_grid}.")
        self.surface_radius = check_optional_float("surface_radius", surface_radius, minimum=0.0, strict_minimum=True)
        self.surface_bn_policy = check_choice("surface_bn_policy", surface_bn_policy, SURFACE_BN_POLICIES)
        if self.surface and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "HessianMonitor(surface=True) draws the surface with matplotlib, which is not installed: "
                "`pip install matplotlib` (or `pip install 'lightning-landscape[plots]'`)."
            )
        self._snapshot: UpdateSnapshot | None = None
        self._snapshot_step = -1
        self._gram: tuple[Tensor, Tensor] | None = None  # (the vectors it was computed from, their Gram matrix)
        self._surface_due = False
        self._surfaces = 0  # measurements seen, for the surface cadence
        #: The latest Hessian-axes surface (``None`` before the first).
        self.last_surface: Surface | None = None
        #: ``(step, update_top_fraction)`` pairs, the latest ``HISTORY``.
        self.update_fractions: deque[tuple[int, float]] = deque(maxlen=HISTORY)
        #: The SLQ result of the current measurement, left here by ``HessianMonitor._log_density``.
        self.density: Any = None

    # ------------------------------------------------------------------------------------ update_top_fraction
    @staticmethod
    def _top_vectors(monitor: HessianMonitor) -> Tensor | None:
        vectors = monitor._warm.get("top")
        if vectors is None or vectors.dim() != 2:
            return None
        # with lambda_min=True the bottom vector is appended after the min(top_k, n) top ones
        return vectors[: min(monitor.top_k, vectors.shape[1])]

    def before_optimizer_step(
        self, monitor: HessianMonitor, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """On a logging step, copy the monitored parameters to the CPU (once per optimizer step)."""
        if not self.update_top_fraction or self._snapshot_step == trainer.global_step:
            return
        if not is_logging_step(trainer.global_step, trainer.log_every_n_steps):
            return
        vectors = self._top_vectors(monitor)
        if vectors is None:
            return  # no measurement yet
        params = list(select_parameters(pl_module, monitor.params).values())
        if sum(p.numel() for p in params) != vectors.shape[1]:
            return  # the selection changed size since the measurement
        self._snapshot = UpdateSnapshot(params)
        self._snapshot_step = trainer.global_step

    def after_train_batch(self, monitor: HessianMonitor, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the step: log the share of the update in the span of the latest top eigenvectors."""
        if self._snapshot is None or trainer.global_step <= self._snapshot_step:
            return  # no snapshot, or a gradient-accumulation micro-batch before the step
        snapshot, self._snapshot = self._snapshot, None
        vectors = self._top_vectors(monitor)
        if vectors is None:
            return
        params = list(select_parameters(pl_module, monitor.params).values())
        source = monitor._warm["top"]
        if self._gram is None or self._gram[0] is not source:  # new vectors since the last step: new Gram matrix
            v = vectors.to(torch.float64)
            self._gram = (source, v @ v.T)
        try:
            fraction = snapshot.fraction(params, vectors, self._gram[1])
        except ValueError as err:  # the parameters changed shape inside the step: skip, never stop training
            monitor._warn_once("update-fraction-shape", f"HessianMonitor: update_top_fraction skipped ({err})")
            return
        if math.isnan(fraction):
            return  # no update (a skipped step): nothing to split
        step = trainer.global_step
        self.update_fractions.append((step, fraction))
        metrics = {monitor.key("update_top_fraction"): fraction}
        monitor.last_metrics.update(metrics)
        monitor.log_metrics(trainer, metrics, step)

    # ----------------------------------------------------------------------------------------- measurement
    def after_measure(
        self,
        monitor: HessianMonitor,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        step: int,
        metrics: dict[str, float],
    ) -> None:
        """Add the HESD criteria (when the density was measured) and, on the surface cadence, the surface."""
        density, self.density = self.density, None
        if density is not None:
            re_value, khn = hesd_criteria(density.nodes, density.weights, 0.5)
            metrics[monitor.key("hesd_re")] = re_value
            metrics[monitor.key("hesd_khn")] = khn
        if not self.surface:
            return
        if self._surfaces % self.surface_every == 0:
            self._surface_due = True
        self._surfaces += 1
        if self._surface_due and f"{monitor.prefix}/sharpness" in metrics:
            # only where this measurement converged the Hessian's own top vectors (every one under SGD; every
            # `raw_sharpness_every`-th under Adam): the surface then matches the logged eigenvalues
            self._surface_due = False
            metrics.update(self._surface(monitor, trainer, pl_module, batches, step, metrics))

    def _surface(
        self,
        monitor: HessianMonitor,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        step: int,
        metrics: dict[str, float],
    ) -> dict[str, float]:
        params = select_parameters(pl_module, monitor.params)
        top = monitor._warm["top"]
        out: dict[str, float] = {}
        if monitor.top_k >= 2 and top.shape[0] >= 2:
            directions = top[:2]
            eigenvalues = [metrics[monitor.key("eig_1")], metrics[monitor.key("eig_2")]]
        else:
            # top_k = 1: a top-2 Lanczos for this surface only, warm-started from v1 (counted apart)
            generator = torch.Generator().manual_seed(monitor.seed * 1_000_003 + step + 7919)
            with operator_mode(pl_module, monitor.mode), monitor._operator(pl_module, batches, params, trainer) as op:
                if op.shape[0] < 2:
                    return {}
                result = lanczos(
                    op,
                    k=2,
                    tol=monitor.tol,
                    max_iter=min(monitor.max_iter, op.shape[0]),
                    init=top[:1].to(device=op.device, dtype=op.dtype),
                    generator=generator,
                    basis_device="cpu" if monitor.basis_on_cpu else None,
                )
                out[monitor.key("surface_hvps")] = float(op.num_matvecs)
            directions = result.eigenvectors.detach().to("cpu")
            eigenvalues = [float(v) for v in result.eigenvalues[:2]]
        loss_fn = monitor.resolve_loss_fn(pl_module)
        recompute = monitor.mode == "eval" and self.surface_bn_policy == "recompute" and has_batchnorm(pl_module)
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]

        def loss_at() -> float:
            if recompute:
                recompute_batchnorm(pl_module, batches, loss_fn)
                if trainer.world_size > 1:  # every rank re-estimated on its own slice
                    distributed.average_batchnorm_statistics(pl_module)
            with operator_mode(pl_module, monitor.mode):
                totals = probe_set_totals(
                    pl_module, loss_fn, batches, seed=monitor.seed, batch_size_fn=monitor.batch_size_fn
                )
            if trainer.world_size > 1:
                totals = distributed.all_reduce_sum(totals)
            value = float(totals[0] / totals[2])
            if not math.isfinite(value):
                raise FloatingPointError(f"The probe-set loss on the Hessian-axes surface is not finite ({value}).")
            return value

        try:
            radius = self.surface_radius
            evaluations = 0
            if radius is None:
                centre = loss_at()
                evaluations += 1
                # the distance at which the quadratic model along v1 doubles the probe loss
                radius = math.sqrt(2 * max(centre, 1e-8) / eigenvalues[0]) if eigenvalues[0] > 0 else 1.0
            surface = hessian_plane(params, directions, loss_at, radius, self.surface_grid)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        self.last_surface = surface
        out.update(
            {
                monitor.key("surface_loss"): surface.centre,
                monitor.key("surface_radius"): float(radius),
                monitor.key("surface_curvature_v1"): surface.curvature(0),
                monitor.key("surface_curvature_v2"): surface.curvature(1),
                monitor.key("surface_max_rise"): float(surface.losses.max()) - surface.centre,
                monitor.key("surface_evaluations"): float(surface.num_evaluations + evaluations),
            }
        )
        if trainer.is_global_zero and any(True for _ in tb._writers(trainer)):
            figure = surface_figure(surface, eigenvalues, f"step {step}: loss at theta + a v1 + b v2")
            tb.log_figure(trainer, monitor.key("surface"), figure, step)
        return out


def surface_figure(surface: Surface, eigenvalues: Sequence[float], title: str) -> Any:
    """The matplotlib figure of ``surface`` with the eigenvalues on its axes (the TensorBoard image's drawing)."""
    return tb.surface_figure(
        surface.alphas.tolist(),
        surface.betas.tolist(),
        surface.losses.tolist(),
        xlabel=f"a along v1 (lambda_1 = {eigenvalues[0]:.4g})",
        ylabel=f"b along v2 (lambda_2 = {eigenvalues[1]:.4g})",
        title=title,
        curvature=eigenvalues[0],
    )


__all__ = ["SURFACE_BN_POLICIES", "HessianViews", "surface_figure"]
