"""HessianMonitor: sharpness, top Hessian eigenvalues, trace and spectral density during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape import tensorboard as tb
from lightning_landscape.callbacks._base import LandscapeCallback
from lightning_landscape.callbacks._hessian_probe import ProbeFraction
from lightning_landscape.callbacks._hessian_stability import _EdgeOfStability
from lightning_landscape.callbacks._hessian_views import HessianViews
from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int, check_regex
from lightning_landscape.core.alerts import ConsecutiveAboveRule, RelativeJumpRule
from lightning_landscape.core.density import slq_density
from lightning_landscape.core.hvp import BACKENDS, HessianOperator, operator_mode
from lightning_landscape.core.lanczos import lanczos
from lightning_landscape.core.params import ParamSelector, select_parameters, top_level_blocks
from lightning_landscape.core.trace import hutchpp_trace


class HessianMonitor(_EdgeOfStability, LandscapeCallback):
    """Top Hessian eigenvalues (sharpness), the most negative one, trace and spectral density of the training loss.

    The operator is the Hessian of the size-weighted mean loss over the probe set, with respect to the selected
    parameters, in ``mode`` (see :class:`~lightning_landscape.callbacks._base.LandscapeCallback`). Eigenpairs come
    from Lanczos with full reorthogonalisation, warm-started from the previous measurement's eigenvectors, stopped by
    a Ritz-residual rule (``tol`` relative to the sharpness). Under DDP every rank computes its local Hessian-vector
    product, one all-reduce makes it global, and every rank runs the same Lanczos.

    Logged metrics (``p`` = ``prefix``):
        - ``p/sharpness``: largest eigenvalue.
        - ``p/hessian/eig_{i}``: i = 1..top_k, descending.
        - ``p/hessian/lambda_min``: smallest eigenvalue (negative curvature), when ``lambda_min=True``.
        - ``p/hessian/converged``: 1 if every requested pair met the residual rule.
        - ``p/hessian/hvps``: Hessian-vector products this measurement cost (all parts together).
        - ``p/hessian/probe_fraction``: the share of each probe batch the operator uses (``probe_fraction``).
        - ``p/hessian/trace``, ``p/hessian/trace_stderr``: Hutch++ estimate, when ``trace=True``.
        - ``p/hessian/density``: TensorBoard histogram of the SLQ spectral density, when ``density=True``.
        - ``p/hessian/eos_ratio``: ``p/hessian/eos_sharpness`` over ``p/hessian/stability_threshold``, with
          ``p/hessian/log10_eos_ratio`` its log10 (0 = at the threshold; the dashboard's ratio chart). The
          thresholds are exact linear-stability limits (:mod:`~lightning_landscape.core.stability`, derived there
          and tested against bisection): SGD ``(2+2b)/((1-d) lr)`` (momentum ``b``, dampening ``d``), Nesterov
          ``(2+2b)/((1+2b) lr)``; Adam/AdamW ``(2+2 beta1)(1-beta1^(t+1))/((1-beta1) lr)`` at step ``t``
          (AMSGrad's ``max_exp_avg_sq`` in the preconditioner).
        - ``p/hessian/eos_sharpness``: what the threshold applies to: the sharpness under plain SGD; under Adam/AdamW
          (and SGD with per-group learning rates) the preconditioned sharpness ``lambda_max(D H D)``, also logged as
          ``p/hessian/preconditioned_sharpness`` (``D = sqrt(lr_i / lr / P_i)``, 0 on entries Adam has never
          moved: second moment still exactly 0).
        - ``p/hessian/block/{name}/eig_1``: top eigenvalue of each top-level block's diagonal Hessian block,
          when ``per_block=True``.
        - ``p/hessian/status``: 1 ok, 0 the measurement failed (non-finite loss); see ``strict``.
        - ``p/hessian/update_top_fraction``, when ``update_top_fraction=True``: at every logging step (Lightning's
          ``log_every_n_steps``) after the first measurement, the share of the squared norm of that step's update
          in the span of the top ``top_k`` eigenvectors of the Hessian itself (the latest raw measurement; under
          Adam the update is Adam's, the vectors are H's, not the preconditioned operator's). River vs mountain:
          Wen et al., arXiv 2410.05192. See :mod:`~lightning_landscape.core.river`.
        - ``p/hessian/surface`` (TensorBoard image), when ``surface=True``: the probe loss on the grid
          ``theta + a v1 + b v2`` along the top two eigenvectors (a contour, and its slice along ``v1`` beside the
          quadratic model), every ``surface_every``-th measurement, with the scalars ``surface_loss`` (centre),
          ``surface_radius``, ``surface_curvature_v1``/``_v2`` (second differences at the centre, the eigenvalues
          on a quadratic), ``surface_max_rise``, ``surface_evaluations`` and, with ``top_k=1``, ``surface_hvps``.
          Gabdullin, arXiv 2412.10146 (LLA). See :mod:`~lightning_landscape.core.surface`.
        - ``p/hessian/hesd_re``, ``p/hessian/hesd_khn``, when ``density=True``: the HESD criteria as LLA defines
          them, from the SLQ nodes and weights: ``|lambda_min / lambda_max|`` and ``Kh_0.5`` (negative-to-positive
          weighted curvature mass), averaged over runs (:func:`~lightning_landscape.core.surface.hesd_criteria`).

    Under Adam/AdamW (and SGD with per-group learning rates) each measurement converges the preconditioned
    sharpness, which decides stability; the Hessian's own spectrum (``p/sharpness``, ``eig_i``, ``lambda_min``,
    per-block values) is measured on every ``raw_sharpness_every``-th measurement only (default 10; 1 = every time),
    and always when no preconditioner exists yet (before Adam's first step). A run that starts measuring after
    Adam's first step (``LandscapeMonitor``) logs its first raw spectrum at its ``raw_sharpness_every``-th
    measurement: the first point is one cold Lanczos, not two.

    Alerts: ``edge_of_stability`` when ``eos_ratio > eos_threshold`` for ``eos_patience`` consecutive measurements;
    ``sharpness_growth`` when ``eos_sharpness`` (the sharpness where no threshold is known) exceeds ``(1 +
    sharpness_jump)`` times the previous measurement while
    ``eos_ratio >= growth_min_eos_ratio`` (where the ratio is known): far below the stability threshold a doubling is
    ordinary early-training behaviour (the quickstart's sharpness went 0.66 -> 2.39 at eos_ratio 0.03).
    Under Adam/AdamW both alerts also need ``eos_ratio > adaptive_eos_peak`` (default 2.25): the streak of
    ``edge_of_stability`` must reach it, and a ``sharpness_growth`` jump must land above it. Adam trains at a
    preconditioned ratio around 1 as its normal regime (Cohen et al. 2022, arXiv 2207.14484): healthy AdamW language
    models reached 1.67 and 1.35 at steps 20-30 (nanoGPT, lr 3e-3) while the runs that diverged later had reached
    3.1-7.4 (and 258) by their first alert.

    Cost per measurement: Lanczos HVPs (typically 5-20 cold, a handful warm-started, at most ``max_iter``), plus
    ``trace_matvecs``, ``density_runs * density_steps``, one top-1 Lanczos per block; under Adam one top-1 Lanczos
    of the preconditioned operator, the raw one every ``raw_sharpness_every`` measurements. One HVP is one backward
    pass through the probe batch's gradient graph: 1.3-2.4 training steps on CPU for a whole training batch
    (``backend="graph"``; the graph itself costs one more), about half that on half a batch (``probe_fraction``).
    As LandscapeMonitor configures it (one probe batch, AdamW, every 200 steps, tol 1e-2, ``probe_fraction="auto"``:
    the whole batch on the digits MLP, half on the digits CNN and the transformers), warm measurements cost 2-8
    HVPs (4.6-13 training steps) on the MLP, 2-4 (2.4-5.8) on the CNN, 3-10 (3.5-11) on the character transformer
    and 4-8 (5.8-10) on nanoGPT; at tol 1e-3 on whole batches they cost 7-15, 4-14, 9-27 and 12-21 steps
    (``benchmarks/hessian.py --part bundle``, RESULTS.md). On the transformers the preconditioned top eigenvector
    moves so much between measurements that a warm start saves little.

    Args:
        top_k: number of top eigenvalues.
        trace: also estimate the trace (Hutch++, ``trace_matvecs`` HVPs).
        density: also estimate the spectral density (stochastic Lanczos quadrature).
        mode: ``"eval"`` or ``"train"`` (see the base class).
        params: ``None`` (all trainable), a regex, or a list of names/module prefixes.
        per_block: also log the top eigenvalue of each top-level block.
        lambda_min: also converge and log the smallest eigenvalue (about doubles the HVPs of a measurement: the
            bottom of the spectrum converges more slowly than the top).
        tol: relative eigenvalue accuracy: Lanczos stops when ``min(r, 10 r^2 / gap) <= tol * sharpness``
            (:func:`~lightning_landscape.core.lanczos.lanczos`, ``criterion="eigenvalue"``).
        max_iter: most HVPs one Lanczos run may use.
        trace_matvecs: HVP budget of the trace estimate.
        density_runs, density_steps, density_bins: SLQ runs, Lanczos steps per run, and histogram bins.
        backend: HVP backend, ``"auto"``, ``"func"``, ``"double_backward"`` or ``"graph"``.
        basis_on_cpu: keep the Krylov basis in host memory (saves accelerator memory for big models).
        eos_threshold, eos_patience: the edge-of-stability alert rule.
        sharpness_jump: relative jump for the ``sharpness_growth`` alert.
        growth_min_eos_ratio: the ``sharpness_growth`` alert needs at least this ``eos_ratio`` (ignored when the
            optimizer has no known threshold).
        adaptive_eos_peak: under Adam/AdamW, the ``eos_ratio`` that an ``edge_of_stability`` streak must exceed at
            least once, and that a ``sharpness_growth`` jump must land above (``max(growth_min_eos_ratio,
            adaptive_eos_peak)``). Plain SGD keeps the rules above unchanged.
        raw_sharpness_every: under a preconditioned optimizer, measure the Hessian's own spectrum on every this
            many measurements (the preconditioned sharpness is measured every time).
        batch_size_fn: ``batch -> int`` for the size weights (default: leading dimension of the first tensor).
        update_top_fraction: log ``update_top_fraction`` (no HVP; on logging steps one host copy of the monitored
            parameters, taken before the optimizer step and freed after it, and ``top_k + 1`` dot products).
        surface: draw the Hessian-axes surface (needs matplotlib). With ``top_k=1`` a top-2 Lanczos, warm-started
            from ``v1``, runs for each surface only. Cost: ``surface_grid**2 + 1`` passes over the probe set (twice
            that in eval mode with BatchNorm and ``surface_bn_policy="recompute"``); memory: one copy of the
            monitored parameters and the two directions on their device.
        surface_every: draw it on every this many measurements (under Adam the next one that measures the
            Hessian's own spectrum).
        surface_grid: points per axis, odd, ``>= 3``.
        surface_radius: half-width of the square in parameter-space distance (unit eigenvectors); ``None``: the
            distance at which the quadratic model along ``v1`` doubles the probe loss, ``sqrt(2 L / lambda_1)``.
        surface_bn_policy: eval mode: ``"recompute"`` re-estimates BatchNorm statistics over the probe set at every
            grid point (as ModeConnectivityMonitor does), ``"keep"`` keeps the current running statistics.
        probe_fraction: the operator's data is the first ``ceil(probe_fraction * n)`` samples of each of its
            ``num_probe_batches`` probe batches of ``n`` samples (every tensor with that leading dimension is cut,
            :func:`~lightning_landscape.core.modes.leading_samples`; a batch with no such tensor is used whole,
            with a warning). A product costs about that share of a whole batch's; the operator is then a smaller
            batch's Hessian (its sharpness is biased upward), fixed for the run like the probe set. ``"auto"``
            (``LandscapeMonitor``'s default): in budget mode, 1 or 1/2, the larger whose predicted warm
            measurement fits 45% of this monitor's share of 500 steps (under Adam/AdamW; under SGD it keeps the
            whole batch), decided once from three timed products at the first measurement
            (:mod:`~lightning_landscape.callbacks._hessian_probe`); logged as ``p/hessian/probe_fraction``.
        **kwargs: the shared arguments of :class:`~lightning_landscape.callbacks._base.LandscapeCallback`
            (``every_n_steps``, ``loss_fn``, ``num_probe_batches``, ``on_alert``, ``prefix``, ...).

    References: Cohen et al. 2021 (Edge of Stability, ICLR); Cohen et al. 2022 (arXiv 2207.14484); Sagun et al.
    2017 (arXiv 1706.04454); Ghorbani, Krishnan & Xiao 2019 (ICML); Meyer et al. 2021 (Hutch++).
    """

    group = "hessian"
    needs_full_parameters = True
    # budget mode's first estimate: a cold top-1 Lanczos cost 80-210 training steps on the reference workloads
    first_cost_steps = 150.0

    def __init__(
        self,
        top_k: int = 1,
        trace: bool = False,
        density: bool = False,
        mode: str = "eval",
        *,
        params: ParamSelector = None,
        per_block: bool = False,
        lambda_min: bool = False,
        tol: float = 1e-3,
        max_iter: int = 100,
        trace_matvecs: int = 30,
        density_runs: int = 1,
        density_steps: int = 40,
        density_bins: int = 60,
        backend: str = "auto",
        basis_on_cpu: bool = False,
        eos_threshold: float = 1.0,
        eos_patience: int = 2,
        sharpness_jump: float = 1.0,
        growth_min_eos_ratio: float = 0.5,
        adaptive_eos_peak: float = 2.25,
        raw_sharpness_every: int = 10,
        batch_size_fn: Callable[[Any], int] | None = None,
        update_top_fraction: bool = False,
        surface: bool = False,
        surface_every: int = 10,
        surface_grid: int = 9,
        surface_radius: float | None = None,
        surface_bn_policy: str = "recompute",
        probe_fraction: float | str = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, **kwargs)
        self.top_k = check_int("top_k", top_k, minimum=1)
        self.trace = check_bool("trace", trace)
        self.density = check_bool("density", density)
        if params is not None and not isinstance(params, str | Sequence):
            raise TypeError(f"`params` must be None, a regex string or a list of names, got {params!r}.")
        self.params = params
        self.per_block = check_bool("per_block", per_block)
        self.lambda_min = check_bool("lambda_min", lambda_min)
        self.tol = check_float("tol", tol, minimum=0.0, strict_minimum=True)
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        if self.top_k > self.max_iter:
            raise ValueError(
                f"`top_k` must be <= `max_iter` ({self.max_iter}: Lanczos needs at least one product per "
                f"eigenvalue), got {self.top_k}."
            )
        check_regex("params", params)
        self.trace_matvecs = check_int("trace_matvecs", trace_matvecs, minimum=3)
        self.density_runs = check_int("density_runs", density_runs, minimum=1)
        self.density_steps = check_int("density_steps", density_steps, minimum=2)
        self.density_bins = check_int("density_bins", density_bins, minimum=2)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.basis_on_cpu = check_bool("basis_on_cpu", basis_on_cpu)
        self.eos_rule = ConsecutiveAboveRule(
            check_float("eos_threshold", eos_threshold, minimum=0.0), check_int("eos_patience", eos_patience, minimum=1)
        )
        jump = check_float("sharpness_jump", sharpness_jump, minimum=0.0, strict_minimum=True)
        self.growth_rule = RelativeJumpRule(jump)
        self.raw_sharpness_every = check_int("raw_sharpness_every", raw_sharpness_every, minimum=1)
        self.growth_min_eos_ratio = check_float("growth_min_eos_ratio", growth_min_eos_ratio, minimum=0.0)
        self.adaptive_eos_peak = check_float("adaptive_eos_peak", adaptive_eos_peak, minimum=0.0)
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(f"`batch_size_fn` must be None or a callable batch -> int, got {batch_size_fn!r}.")
        self.batch_size_fn = batch_size_fn
        self._probe_fraction = ProbeFraction(probe_fraction)
        #: The setting: a number, or ``"auto"`` (the fraction in use is logged as ``{p}/hessian/probe_fraction``).
        self.probe_fraction = self._probe_fraction.setting
        # Warm-start vectors (on CPU between measurements): "top" for H, "precond" for Adam's form, "block/<name>".
        self._warm: dict[str, Tensor] = {}
        self._growth_key = ""
        self._adaptive = False  # the last measurement's threshold is Adam's: the curvature alerts need the peak
        self._measured = 0  # measurements made
        # measurements since the last raw spectrum: under a preconditioned optimizer the raw one comes every
        # `raw_sharpness_every` measurements, the first one after `raw_sharpness_every - 1` preconditioned ones
        self._since_raw = 0
        self._shift: Tensor | None = None  # W D^2 of coupled weight decay in the scaled operator (stability_shift)
        # update_top_fraction, the Hessian-axes surface and the HESD criteria (validated there)
        self._views = HessianViews(
            update_top_fraction=update_top_fraction,
            surface=surface,
            surface_every=surface_every,
            surface_grid=surface_grid,
            surface_radius=surface_radius,
            surface_bn_policy=surface_bn_policy,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # A selector that matches nothing fails here, before training, not at the first measurement.
        select_parameters(pl_module, self.params)

    def needs_hook(self, hook: str) -> bool:
        # these two only serve update_top_fraction
        if hook in ("on_before_optimizer_step", "on_train_batch_end"):
            return self._views.update_top_fraction
        return True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._views.before_optimizer_step(self, trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._views.after_train_batch(self, trainer, pl_module)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "params": str(self.params), "mode": self.mode}

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "warm": {k: v.clone() for k, v in self._warm.items()},
            "eos_rule": self.eos_rule.state_dict(),
            "growth_rule": self.growth_rule.state_dict(),
            "measured": self._measured,
            "since_raw": self._since_raw,
            "surface": {"seen": self._views._surfaces, "due": self._views._surface_due},
            "probe_fraction": self._probe_fraction.state_dict(),
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        self._warm = {k: v.clone() for k, v in state.get("warm", {}).items()}
        self.eos_rule.load_state_dict(state.get("eos_rule", {}))
        self.growth_rule.load_state_dict(state.get("growth_rule", {}))
        self._measured = int(state.get("measured", 0))
        # a checkpoint from before "since_raw": its cadence was `measured % raw_sharpness_every == 0`
        every = self.raw_sharpness_every
        self._since_raw = int(state.get("since_raw", (self._measured + every - 1) % every))
        surface = state.get("surface", {})  # absent before the surface existed: its cadence restarts
        self._views._surfaces = int(surface.get("seen", 0))
        self._views._surface_due = bool(surface.get("due", False))
        self._probe_fraction.load_state_dict(state.get("probe_fraction", {}))

    # ----------------------------------------------------------------------------------------------- measure
    def _operator(
        self, pl_module: pl.LightningModule, batches: list[Any], params: dict, trainer: pl.Trainer
    ) -> HessianOperator:
        return HessianOperator(
            pl_module,
            self.resolve_loss_fn(pl_module),
            batches,
            params=params,
            backend=self.backend,
            batch_size_fn=self.batch_size_fn,
            seed=self.seed,
            all_reduce=distributed.all_reduce_sum if trainer.world_size > 1 else None,
        )

    def _lanczos(self, op: Any, key: str, k: int, smallest: bool, generator: torch.Generator) -> Any:
        init = self._warm.get(key)
        if init is not None and init.shape[-1] != op.shape[0]:
            init = None  # the parameter selection changed shape: start cold
        result = lanczos(
            op,
            k=min(k, op.shape[0]),
            smallest=smallest,
            tol=self.tol,
            max_iter=min(self.max_iter, op.shape[0]),
            init=None if init is None else init.to(device=op.device, dtype=op.dtype),
            generator=generator,
            basis_device="cpu" if self.basis_on_cpu else None,
        )
        vectors = result.eigenvectors.detach()
        if smallest and result.lambda_min_vector is not None:
            # keep the bottom vector too: warm-started from the top ones only, the most negative direction would
            # enter the Krylov space through the 1e-3 random part alone and could be missed
            vectors = torch.cat([vectors, result.lambda_min_vector.detach()[None]])
        self._warm[key] = vectors.to("cpu", copy=True)
        return result

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any], step: int
    ) -> dict[str, float]:
        params = select_parameters(pl_module, self.params)
        stability = self._stability(trainer, params)
        # "auto" halves the batch only under Adam/AdamW, whose curvature alerts need a peak well above the threshold
        adaptive = stability is not None and stability[0].optimizer == "adam"
        batches, hvps = self._probe_fraction.batches(self, trainer, pl_module, batches, params, step, adaptive)
        dtype = next(iter(params.values())).dtype
        if dtype in (torch.bfloat16, torch.float16):
            self._warn_once(
                "low-precision",
                f"HessianMonitor: the parameters are {str(dtype).removeprefix('torch.')}, so every Hessian-vector "
                "product carries about 1% noise and Lanczos amplifies it; eigenvalues are rough. Train with fp32 "
                "master weights (precision='16-mixed' or 'bf16-mixed') for accurate curvature.",
            )
        # Identically seeded on every rank, so every rank draws the same start vectors and runs the same Lanczos.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        metrics: dict[str, float] = {self.key("probe_fraction"): self._probe_fraction.value}
        # Under a preconditioned optimizer the preconditioned sharpness decides stability; the Hessian's own
        # spectrum is measured on every `raw_sharpness_every`-th measurement only (and whenever no preconditioned
        # form exists yet, e.g. before Adam's first step). Not on the first one when a preconditioner exists: a
        # cold raw Lanczos there doubled the first point's cost (the one the budget can bound only by estimate).
        raw = stability is None or stability[1] is None or self._since_raw + 1 >= self.raw_sharpness_every
        self._since_raw = 0 if raw else self._since_raw + 1
        self._measured += 1
        preconditioned = stability is not None and stability[0].preconditioned
        self._growth_key = self.key("eos_sharpness") if preconditioned else f"{self.prefix}/sharpness"
        self._adaptive = stability is not None and stability[0].optimizer == "adam"
        with operator_mode(pl_module, self.mode):
            with self._operator(pl_module, batches, params, trainer) as op:
                self.log_definition(trainer, self._definition(op, len(batches)))
                sharpness = None
                if raw:
                    sharpness = self._raw_spectrum(op, generator, step, metrics)
                if self.trace:
                    estimate = hutchpp_trace(op, self.trace_matvecs, generator=generator)
                    metrics[self.key("trace")] = estimate.estimate
                    metrics[self.key("trace_stderr")] = estimate.stderr
                if self.density:
                    self._log_density(trainer, op, generator, step)
                if stability is not None:
                    metrics.update(self._edge_of_stability(op, stability, sharpness, generator))
                hvps += op.num_matvecs
            if self.per_block and raw:
                blocks = top_level_blocks(params)
                for name, names in blocks.items():
                    with self._operator(pl_module, batches, {n: params[n] for n in names}, trainer) as block_op:
                        block = self._lanczos(block_op, f"block/{name}", 1, False, generator)
                        metrics[self.key(f"block/{name}/eig_1")] = float(block.eigenvalues[0])
                        hvps += block_op.num_matvecs
        metrics[self.key("hvps")] = float(hvps)
        self._check_alerts(trainer, metrics, step)
        self._views.after_measure(self, trainer, pl_module, batches, step, metrics)
        return metrics

    def _raw_spectrum(self, op: HessianOperator, generator: torch.Generator, step: int, metrics: dict) -> float:
        result = self._lanczos(op, "top", self.top_k, self.lambda_min, generator)
        eigenvalues = result.eigenvalues.tolist()
        metrics[f"{self.prefix}/sharpness"] = eigenvalues[0]
        for i, value in enumerate(eigenvalues, start=1):
            metrics[self.key(f"eig_{i}")] = value
        if self.lambda_min and result.lambda_min is not None:
            metrics[self.key("lambda_min")] = float(result.lambda_min)
        metrics[self.key("converged")] = float(result.converged)
        if not result.converged:
            self._warn_once(
                "not-converged",
                f"HessianMonitor: Lanczos did not reach tol={self.tol} in max_iter={self.max_iter} HVPs at "
                f"step {step}; the logged values are the best Ritz values (see `{self.key('converged')}`).",
            )
        return eigenvalues[0]

    def _definition(self, op: HessianOperator, num_batches: int) -> str:
        selection = "all trainable parameters" if self.params is None else f"parameters selected by {self.params!r}"
        if self.mode == "eval":
            mode = "running BatchNorm statistics, dropout off"
        else:
            mode = "batch statistics, BatchNorm buffers untouched, dropout masks fixed by seed"
        fraction = self._probe_fraction
        if fraction.value < 1.0:
            cut = f": the first {fraction.value:g} of the samples of each of {num_batches} probe batch(es) per process"
        else:
            cut = f" in {num_batches} probe batch(es) per process"
        if fraction.setting == "auto":
            predicted = fraction.predicted_steps
            cut += f" (probe_fraction='auto' chose {fraction.value:g}" + (
                "" if predicted is None else f": a whole-batch warm measurement predicted at {predicted:.1f} steps"
            )
            cut += ")"
        return (
            f"Hessian of the mean loss over {op.num_samples} examples{cut} "
            f"(the first training batches seen, fixed for the whole run), weighted by batch size; {selection} "
            f"({op.shape[0]} values, {op.dtype}); mode={self.mode!r} ({mode}); backend={op.backend!r}; "
            f"Lanczos tol={self.tol} relative to the sharpness."
        )

    def _log_density(self, trainer: pl.Trainer, op: Any, generator: torch.Generator, step: int) -> None:
        spectrum = slq_density(
            op,
            num_runs=self.density_runs,
            num_steps=min(self.density_steps, op.shape[0]),
            generator=generator,
            basis_device="cpu" if self.basis_on_cpu else None,
        )
        lo, hi = float(spectrum.nodes.min()), float(spectrum.nodes.max())
        pad = 1e-6 + 0.02 * (hi - lo)
        edges = torch.linspace(lo - pad, hi + pad, self.density_bins + 1, dtype=torch.float64)
        tb.log_histogram_raw(trainer, self.key("density"), edges, spectrum.histogram(edges), step)
        self._views.density = spectrum  # the HESD criteria are computed from it at the end of `measure`
