"""How much of each probe batch the Hessian's operator uses: ``HessianMonitor(probe_fraction=...)``.

A Hessian-vector product costs about a pass over its data, so the operator's data decides what a measurement costs.
``probe_fraction`` is either a number (the first ``ceil(f * n)`` samples of each probe batch of ``n``) or
``"auto"`` (what ``LandscapeMonitor`` uses): 1 or 1/2, the larger whose *predicted* warm measurement fits
``AUTO_HEADROOM`` (45%) of the monitor's share of the budget over ``AUTO_TARGET_STEPS`` training steps, decided
once, before the first measurement, so that every logged value of the run is on one operator.

The prediction: at the first measurement three products on the whole probe batch are timed (the first also builds
the gradient graph); a warm measurement is taken to cost ``first + (AUTO_WARM_PRODUCTS - 1) * min(second, third)``,
and a fraction ``f`` of the batch about ``f`` times that (measured: a warm measurement on half a batch cost
0.4-0.7x the whole batch's, benchmarks/RESULTS.md). Outside budget mode, before the step time is known, or under an
optimizer other than Adam/AdamW (see ``ProbeFraction.batches``), ``"auto"`` keeps the whole batch. Under DDP rank
0's clock decides and its choice is broadcast. The three timing products are counted in the measurement's ``hvps``.

Why not always half: a smaller batch's sharpness is biased upward (the largest eigenvalue of a mean of fewer
per-sample Hessians, on average: ``lambda_max`` is convex). Adam-preconditioned sharpness on half a batch against
the whole one, at the same steps of one run: +8% to +25% on nanoGPT and +12% to +23% on the character transformer,
but -11% to +44% on the digits CNN and +29% to +89% on the digits MLP; for scale, two whole batches of nanoGPT
differed 2.1x (benchmarks/RESULTS.md). Where the whole batch fits (the MLP), ``"auto"`` keeps it.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_landscape.core import distributed
from lightning_landscape.core._validation import check_float
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.modes import default_batch_size, leading_samples

if TYPE_CHECKING:
    from lightning_landscape.callbacks.hessian import HessianMonitor

#: The spacing ``"auto"`` sizes the operator for: DESIGN.md's promise of a sharpness at least every 500 steps.
AUTO_TARGET_STEPS = 500
#: Products of a typical warm measurement under the bundle's settings (measured 2-10, median 6-7, at tol 1e-2).
AUTO_WARM_PRODUCTS = 8
#: The part of the share over ``AUTO_TARGET_STEPS`` a predicted warm measurement may take: the rest is for the first
#: points' repayment and for measurements costlier than the typical one (a 3,000-step nanoGPT run whose whole-batch
#: prediction fitted the full share logged a largest sharpness gap of 905 steps). At 0.6 the digits CNN's prediction
#: straddled the window (1.12-1.78 of it in five runs, below 1 in two of four 3,000-step runs): those runs kept the
#: whole batch and logged largest gaps of 983 and 1442 steps against 301-334 on half a batch. The digits MLP's
#: prediction is 0.34-0.59 of the 0.6 window, so at 0.45 it keeps its whole batch (benchmarks/RESULTS.md).
AUTO_HEADROOM = 0.45
#: The smallest fraction ``"auto"`` picks: a quarter batch read the transformers' sharpness 38-51% high, half a
#: batch 8-25% (the bias grows as the batch shrinks).
AUTO_MIN_FRACTION = 0.5


def check_probe_fraction(value: Any) -> float | str:
    """``"auto"`` or a number in (0, 1]; raise naming ``probe_fraction`` otherwise."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        raise ValueError(f"`probe_fraction` must be 'auto' or a number in (0, 1], got {value!r}.")
    return check_float("probe_fraction", value, minimum=0.0, maximum=1.0, strict_minimum=True)


class ProbeFraction:
    """The setting (``"auto"`` or a number) and, once decided, the fraction in use (saved in the checkpoint)."""

    def __init__(self, setting: float | str) -> None:
        self.setting = check_probe_fraction(setting)
        #: The fraction in use; ``None`` until ``"auto"`` has decided.
        self.value: float | None = None if self.setting == "auto" else float(self.setting)
        self.predicted_steps: float | None = None  # the warm cost ``"auto"`` predicted for the whole batch

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.setting == "auto" and state.get("value") is not None:
            self.value = float(state["value"])  # the resumed run keeps its operator

    def batches(
        self,
        monitor: HessianMonitor,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        params: dict,
        step: int,
        adaptive: bool = True,
    ) -> tuple[list[Any], int]:
        """The operator's batches (views of the probe batches) and the products spent deciding (0 or 3).

        ``adaptive``: the optimizer is Adam/AdamW. Otherwise ``"auto"`` keeps the whole batch: SGD's
        ``edge_of_stability`` compares the sharpness with its threshold directly, and half a batch, which reads it
        higher, raised it at step 10 of a healthy run of Lightning's demo transformer (ratio 1.55;
        ``tests/compat/test_models.py``). Under Adam the alerts also need a peak of 2.25 times the threshold."""
        spent = 0
        if self.value is None:
            if adaptive:
                self.value, spent = self._decide(monitor, trainer, pl_module, batches, params, step)
            else:
                self.value = 1.0
        if self.value >= 1.0:
            return batches, spent
        size_fn = monitor.batch_size_fn or default_batch_size
        out = []
        for batch in batches:
            size = int(size_fn(batch))
            cut, done = leading_samples(batch, max(1, math.ceil(self.value * size)), size)
            if not done and size > 1:
                monitor._warn_once(
                    "uncut-probe",
                    f"HessianMonitor: probe_fraction={self.value} found no tensor of leading dimension {size} to "
                    f"cut in a {type(batch).__name__} batch; that batch is used whole.",
                )
            out.append(cut)
        return out, spent

    def _decide(
        self,
        monitor: HessianMonitor,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: list[Any],
        params: dict,
        step: int,
    ) -> tuple[float, int]:
        budget = monitor.budget
        per_step = None if budget is None else budget.seconds_per_step(step)
        if per_step is None:
            return 1.0, 0
        # the share's budget beside the per-step work's reserve (what the per-step work spends beyond it is not known
        # yet at the first point, and the decision stays for the run)
        shared = budget.max_overhead * (1.0 - budget.reserved_per_step)
        window = AUTO_HEADROOM * monitor.budget_share * shared * AUTO_TARGET_STEPS * per_step
        with operator_mode(pl_module, monitor.mode), monitor._operator(pl_module, batches, params, trainer) as op:
            generator = torch.Generator().manual_seed(monitor.seed * 1_000_003 + step + 1)
            vector = torch.randn(op.shape[0], generator=generator, dtype=torch.float64).to(op.device, op.dtype)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                op @ vector
                if op.device.type == "cuda":
                    torch.cuda.synchronize(op.device)  # a measurement may synchronise; the per-step hooks never do
                times.append(time.perf_counter() - started)
            spent = op.num_matvecs
        # the first product builds the gradient graph; the faster of the next two is one product (robust to a
        # hiccup of a loaded machine on a millisecond model)
        predicted = times[0] + (AUTO_WARM_PRODUCTS - 1) * min(times[1:])
        fraction = 1.0
        while predicted * fraction > window and fraction / 2 >= AUTO_MIN_FRACTION:
            fraction /= 2
        decision = torch.tensor([fraction, predicted / per_step], dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            distributed.broadcast(decision)  # rank 0's clock decides: every rank builds the same operator
        self.predicted_steps = float(decision[1])
        return float(decision[0]), spent


__all__ = [
    "AUTO_HEADROOM",
    "AUTO_MIN_FRACTION",
    "AUTO_TARGET_STEPS",
    "AUTO_WARM_PRODUCTS",
    "ProbeFraction",
    "check_probe_fraction",
]
