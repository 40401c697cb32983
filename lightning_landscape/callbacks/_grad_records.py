"""GradientSpikeMonitor's records and state: one stream of statistics per optimizer, one record per optimizer step
from its first gradient read to its scoring (host and device alike), budget mode's stride and cost tallies, and the
checkpointed state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_landscape.core.alerts import ConsecutiveAboveRule
from lightning_landscape.core.divergence import DivergenceRule
from lightning_landscape.core.spikes import EMAZScore

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Kinds of optimizer step, for budget mode's cost tallies.
_SKIPPED, _READ, _LOGGED = range(3)


@dataclass
class _Stream:
    """One optimizer's gradient statistics (manual optimization with several optimizers keeps one each)."""

    detector: EMAZScore
    growth: ConsecutiveAboveRule | None
    divergence: DivergenceRule | None
    bad: bool = False  # inside a non-finite excursion (non_finite fires on entering it, once)
    overflow_run: int = 0  # consecutive steps a GradScaler skipped
    spike_run: int = 0  # consecutive reads the detector flagged (an isolated one alerts only at `min_spike_ratio`)
    # cached per fit: (number of parameters in the optimizer, names, parameters)
    params: tuple[int, list[str], list[torch.nn.Parameter]] | None = None
    group_names: list[str] = field(default_factory=list)
    group_members: list[list[int]] = field(default_factory=list)
    resolved: list[str] | None = None
    norm_dtype: dict[str, torch.dtype] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "growth": self.growth.state_dict() if self.growth is not None else None,
            "divergence": self.divergence.state_dict() if self.divergence is not None else None,
            "bad": self.bad,
            "overflow_run": self.overflow_run,
            "spike_run": self.spike_run,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.growth is not None and state.get("growth") is not None:
            self.growth.load_state_dict(state["growth"])
        if self.divergence is not None and state.get("divergence") is not None:
            self.divergence.load_state_dict(state["divergence"])
        self.bad = bool(state.get("bad", False))
        self.overflow_run = int(state.get("overflow_run", 0))
        self.spike_run = int(state.get("spike_run", 0))


@dataclass
class _Read:
    """One optimizer's gradients at one step: squared per-tensor norms (host floats, or a device tensor awaiting
    readback), and once scored, the values that are logged."""

    stream: int
    squares: list[float] | Tensor
    scored: dict[str, Any] | None = None
    # logged steps: (<g, theta>, ||theta||^2) for ``nlm_alignment`` (host floats, or a device tensor awaiting readback)
    nlm: tuple[float, float] | Tensor | None = None


@dataclass
class _Step:
    """One optimizer step from its first gradient read to its scoring (one record for host and device alike)."""

    step: int
    weight: float = 1.0  # samples of this step over the usual number (a remainder batch is a fraction)
    reads: list[_Read] = field(default_factory=list)
    loss: Tensor | float | None = None
    update: Tensor | None = None  # (update norm, parameter norm)
    logged: bool = False


class _GradState:
    """Mixin of :class:`~lightning_landscape.callbacks.grad_spikes.GradientSpikeMonitor`: its detectors, rules,
    streams, stride tallies and checkpointed state (the attributes it reads are set in the monitor's ``__init__``)."""

    def _detector(self, log_scale: bool = True) -> EMAZScore:
        return EMAZScore(
            alpha=self.alpha,
            z_threshold=self.z_threshold,
            warmup_steps=self.warmup_steps,
            spike_update=self.spike_update,
            reanchor_steps=self.reanchor_steps,
            log_scale=log_scale,
        )

    def _divergence(self, ratio: float) -> DivergenceRule:
        return DivergenceRule(ratio=ratio, time_constant=self.divergence_steps, horizon=self.divergence_horizon)

    def _new_stream(self) -> _Stream:
        return _Stream(
            detector=self._detector(),
            growth=ConsecutiveAboveRule(self.growth_z, self.growth_patience) if self.growth_z is not None else None,
            divergence=self._divergence(self.grad_divergence_ratio) if self.grad_divergence_ratio is not None else None,
        )

    @property
    def grad_detector(self) -> EMAZScore:
        """The gradient-norm detector (of the first optimizer)."""
        return self._streams[0].detector

    @property
    def growth_rule(self) -> ConsecutiveAboveRule | None:
        """The ``grad_growth`` rule (of the first optimizer); ``None`` when ``growth_z=None``."""
        return self._streams[0].growth

    @property
    def _deferred_losses(self) -> list[tuple[int, Tensor | float | None]]:
        """Losses of the steps whose gradients budget mode skipped, not scored yet."""
        return [(s.step, s.loss) for s in self._waiting if not s.reads]

    def _reset_stride(self) -> None:
        """Stride 1 and empty cost tallies (at construction and at every fit start, when the ledger restarts)."""
        #: Budget mode: the gradients are read every ``stride``-th step (and at every logged step). 1 unless reading
        #: them every step would by itself take more than ``budget_share`` of the budget; the loss is scored every
        #: step regardless. Re-decided at every logged step from the measured costs.
        self.stride = 1
        # seconds and count of the steps of each kind: skipped (loss only), read (gradients), logged (read + logged)
        self._step_costs = {kind: [0.0, 0] for kind in (_SKIPPED, _READ, _LOGGED)}
        self._step_seconds = 0.0  # this step's hook time so far
        self._drain_seconds = 0.0  # of which scoring skipped steps' losses

    def _monitor_state_dict(self) -> dict[str, Any]:
        return {
            "grad_detector": self.grad_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "clip_count": self.clip_count,
            "growth_rule": self.growth_rule.state_dict() if self.growth_rule is not None else None,
            "streams": [stream.state_dict() for stream in self._streams],
            "loss_divergence": self.loss_divergence.state_dict() if self.loss_divergence is not None else None,
            "loss_bad": self._loss_bad,
            "overflow_count": self.overflow_count,
            "usual_samples": self._usual_samples,
            # losses of steps budget mode skipped, not scored yet (a checkpoint can fall between reading steps)
            "deferred_losses": [
                (s.step, None if s.loss is None else float(s.loss), s.weight) for s in self._waiting if not s.reads
            ],
        }

    def _load_monitor_state_dict(self, state: dict[str, Any]) -> None:
        streams = state.get("streams")
        if streams:
            self._streams = [self._new_stream() for _ in streams]
            for stream, stream_state in zip(self._streams, streams, strict=True):
                stream.load_state_dict(stream_state)
        elif "grad_detector" in state:  # a checkpoint of an earlier version
            self.grad_detector.load_state_dict(state["grad_detector"])
            if self.growth_rule is not None and state.get("growth_rule") is not None:
                self.growth_rule.load_state_dict(state["growth_rule"])
        if "loss_detector" in state:
            self.loss_detector.load_state_dict(state["loss_detector"])
        if self.loss_divergence is not None and state.get("loss_divergence") is not None:
            self.loss_divergence.load_state_dict(state["loss_divergence"])
        self._loss_bad = bool(state.get("loss_bad", False))
        self.clip_count = int(state.get("clip_count", 0))
        self.overflow_count = int(state.get("overflow_count", 0))
        self._usual_samples = int(state.get("usual_samples", 0))
        self._waiting = [
            _Step(int(item[0]), weight=float(item[2]) if len(item) > 2 else 1.0, loss=item[1])
            for item in state.get("deferred_losses", [])
        ]

    def _decide_stride(self, trainer: pl.Trainer, step: int) -> None:
        """Budget mode: the smallest stride at which reading the gradients keeps within ``budget_share`` of the
        budget, from the mean cost of a step that reads them (``r``) and of one that does not (``s``): at stride
        ``k`` a step costs ``r / k + s (1 - 1 / k)`` on average. Logged steps are left out: their extra cost (the
        logger's writes, the update norm) comes every ``log_every_n_steps`` whatever the stride, so striding could
        not pay for it (it is charged to the shared ledger like everything else). Collective under DDP (rank 0's
        clock decides).
        """
        per_step = self.budget.seconds_per_step(step)
        stride = self.stride
        (skip_s, skipped), (read_s, read) = self._step_costs[_SKIPPED], self._step_costs[_READ]
        if per_step is not None and read and not self.clip:
            every = self._every_n(trainer)
            read_cost = read_s / read
            skip_cost = skip_s / skipped if skipped else 0.0
            allowed = self.budget_share * self.budget.max_overhead * per_step
            if read_cost <= allowed:
                stride = 1
            elif skip_cost >= allowed:
                stride = every
            else:
                stride = min(every, math.ceil((read_cost - skip_cost) / (allowed - skip_cost)))
        if self._world_size > 1:
            stride = trainer.strategy.broadcast(stride, src=0)
        if stride > 1 and self.stride == 1:
            read = self._step_costs[_READ][0] / max(1, self._step_costs[_READ][1])
            self._warn_once(
                "grad-stride",
                f"GradientSpikeMonitor: reading the gradient norms takes {read * 1e3:.2f} ms a step against "
                f"{(per_step or math.nan) * 1e3:.2f} ms steps, more than its share ({self.budget_share:.0%}) of the "
                f"max_overhead={self.budget.max_overhead:g} budget; it now reads them every {stride} steps (and at "
                "every logged step), and still scores the loss every step. Pass max_overhead=None (LandscapeMonitor: "
                "grad_spikes={'max_overhead': None}) to read every step.",
            )
        self.stride = int(stride)
