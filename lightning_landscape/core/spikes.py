"""Streaming spike detection: an EMA z-score that lives on the device (no host sync per step).

Formulation (ZClip's, Kumar et al. 2025, arXiv 2504.02507, with the defaults it names), applied by default to
``log(x)``:

- warm-up: the first ``warmup_steps`` finite values initialise ``mean`` and the *population* variance (ZClip: 25,
  here 50);
- after warm-up, for each value: ``z = (y - mean) / std_eff`` with ``std_eff = max(sqrt(var) + eps, floor)``;
- a *spike* is ``z > z_threshold``; then the EMA ``mean <- a mean + (1-a) y``, ``var <- a var + (1-a)(y - mean)^2``
  (variance with the already updated mean, as ZClip; ``a = 0.97``), where on a spike ``spike_update`` decides:
  ``"skip"`` (default: a spike never enters the baseline, so the steps after it are judged against healthy
  statistics), ``"clip"`` (ZClip's adaptive value ``mean + z_thr^2 s std_eff / (y - mean)``) or ``"raw"``;
- non-finite values are flagged separately and never enter the statistics;
- level shifts: after ``reanchor_steps`` consecutive spikes the baseline re-anchors: its mean becomes the mean of
  those spiking values (the variance is kept, the noise level has not changed) and the streak starts again. Without
  it, ``spike_update="skip"`` locks onto the old level after a lasting jump (unfreezing a backbone, a learning-rate
  change): a permanent 3x jump at 10 % noise flagged 2000 of the next 2000 steps, and a clip to that level became a
  silent, permanent learning-rate cut; with it, the first ``reanchor_steps`` steps are flagged, then none.

Where we differ from ZClip, and why (measured with ``tests/core/test_spikes.py``'s synthetic sequences):

- ``log_scale=True``: gradient norms and losses fluctuate multiplicatively, so their right tail is heavy on the
  linear scale. On lognormal noise of 30 % the linear z-score at threshold 6 raised 12 false alarms in 50,000
  stationary steps (max z 8.1); on the log scale the max z was 4.4 at every noise level tried (10-50 %), with no
  false alarm, while a 5x spike is still z > 5 up to ~30 % noise and a 100x spike far above.
- ``z_threshold=5``: ZClip clips at 2.5, which suits clipping; natural fluctuations at small batch sizes reach z of
  4-5 on the linear scale, so an *alert* needs more.
- ``min_relative_std=0.02``: a floor on the standard deviation (2 % relative), so a flat, almost noiseless norm
  does not turn a 1 % wiggle into a huge z. ``min_std`` is an absolute floor in the detector's units.

ZClip's exact statistic is ``EMAZScore(z_threshold=2.5, spike_update="clip", log_scale=False,
min_relative_std=0)`` (tested against the zclip package).

All state is tensors on one device and :meth:`EMAZScore.update` uses only tensor ops (``torch.where``), so it can run
every step on a GPU without a ``.item()``; the caller reads results back when it wants to.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_landscape.core._validation import check_bool, check_choice, check_float, check_int

SPIKE_UPDATES = ("skip", "clip", "raw")


class EMAZScore:
    """EMA mean/variance z-score detector over a stream of scalars (or of vectors, channel by channel).

    Args:
        alpha: EMA decay (ZClip: 0.97, an effective window of about 33 steps).
        z_threshold: z above which a value is a spike (ZClip: 2.5 for clipping; 5 here, for alerting).
        warmup_steps: finite values used to initialise the statistics; no spike is flagged before. ZClip uses 25;
            the default 50 halves the error of the initial variance, which otherwise produced the only early false
            alarms we saw (z 5.2 sixteen steps after a 25-step warm-up, one seed in 22).
        spike_update: how a spike enters the statistics: ``"skip"``, ``"clip"`` or ``"raw"``.
        reanchor_steps: after this many consecutive spikes the mean re-anchors to their mean (a level shift, not a
            spike); ``None`` never re-anchors (ZClip's behaviour).
        min_std: absolute floor of the standard deviation.
        min_relative_std: floor of the standard deviation relative to ``|mean|``.
        eps: added to the standard deviation (ZClip: 1e-6).
        log_scale: score ``log(x)`` instead of ``x`` (values <= 0 are skipped: they carry no scale).
        shape: shape of one observation (``()`` for a scalar stream).
        device: where the state lives.

    Raises:
        ValueError / TypeError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 5.0,
        warmup_steps: int = 50,
        spike_update: str = "skip",
        reanchor_steps: int | None = 10,
        min_std: float = 0.0,
        min_relative_std: float = 0.02,
        eps: float = 1e-6,
        log_scale: bool = True,
        shape: tuple[int, ...] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, strict_minimum=True)
        if self.alpha >= 1.0:
            raise ValueError(f"`alpha` must be < 1, got {alpha!r}.")
        self.z_threshold = check_float("z_threshold", z_threshold, minimum=0.0, strict_minimum=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.spike_update = check_choice("spike_update", spike_update, SPIKE_UPDATES)
        self.reanchor_steps = None if reanchor_steps is None else check_int("reanchor_steps", reanchor_steps, minimum=1)
        self.min_std = check_float("min_std", min_std, minimum=0.0)
        self.min_relative_std = check_float("min_relative_std", min_relative_std, minimum=0.0)
        self.eps = check_float("eps", eps, minimum=0.0)
        self.log_scale = check_bool("log_scale", log_scale)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget everything (back to warm-up)."""
        # Scalar stream on the CPU: the state is kept as Python floats (a tensor op costs ~5 us there, so the tensor
        # path would cost ~0.2 ms a step for nothing); results are identical to the tensor path.
        self.on_host = self.device.type == "cpu" and self.shape == ()
        if self.on_host:
            self._mean = self._var = self._sum = self._sumsq = self._streak_sum = 0.0
            self._count = self._streak = 0
            return
        zeros = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self._mean, self._var, self._sum, self._sumsq = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        self._streak_sum = zeros.clone()
        self._count = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self._streak = torch.zeros(self.shape, dtype=torch.int64, device=self.device)

    @property
    def mean(self) -> Tensor:
        """EMA mean (of ``log(x)`` on the log scale)."""
        return torch.tensor(self._mean, dtype=torch.float64) if self.on_host else self._mean

    @property
    def var(self) -> Tensor:
        """EMA variance."""
        return torch.tensor(self._var, dtype=torch.float64) if self.on_host else self._var

    @property
    def count(self) -> Tensor:
        """Finite values seen (saturates meaning only up to ``warmup_steps``)."""
        return torch.tensor(self._count, dtype=torch.int64) if self.on_host else self._count

    def _floor(self, mean: Any) -> Any:
        # On the log scale a relative change is an absolute one: the relative floor applies as is.
        return self.min_relative_std * (1.0 if self.log_scale else abs(mean))

    def std(self) -> Tensor:
        """The floored standard deviation used in the z-score."""
        if self.on_host:
            return torch.tensor(self._std_float(), dtype=torch.float64)
        relative = self.min_relative_std * (torch.ones_like(self._mean) if self.log_scale else self._mean.abs())
        return torch.maximum(self._var.clamp_min(0).sqrt() + self.eps, torch.clamp(relative, min=self.min_std))

    def _std_float(self) -> float:
        return max(math.sqrt(max(self._var, 0.0)) + self.eps, max(self._floor(self._mean), self.min_std))

    def update(self, value: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Feed one observation; returns ``(z, spike, non_finite)`` as tensors on the state's device.

        ``z`` is 0 during warm-up and for non-finite values; ``spike`` is a bool tensor.
        """
        if self.on_host:
            z, spike, bad = self.update_float(float(value))
            return torch.tensor(z, dtype=torch.float64), torch.tensor(spike), torch.tensor(bad)
        x = torch.as_tensor(value).detach().to(device=self.device, dtype=torch.float64).reshape(self.shape)
        is_finite = torch.isfinite(x)
        # "finite" below means usable: on the log scale a zero (a saturated loss, a batch with no gradient) carries
        # no scale information and would drag log-statistics to -69; it is skipped like a non-finite value.
        finite = is_finite & (x > 0) if self.log_scale else is_finite
        if self.log_scale:
            x = torch.log(x.clamp_min(1e-30))
        x_safe = torch.where(finite, x, self._mean)
        warm = self._count >= self.warmup_steps
        std = self.std()
        z = torch.where(warm & finite, (x_safe - self._mean) / std, torch.zeros_like(x_safe))
        spike = warm & finite & (z > self.z_threshold)

        # warm-up accumulation, then initialisation exactly when the warm-up count is reached
        in_warmup = (~warm) & finite
        self._sum = self._sum + torch.where(in_warmup, x_safe, torch.zeros_like(x_safe))
        self._sumsq = self._sumsq + torch.where(in_warmup, x_safe * x_safe, torch.zeros_like(x_safe))
        new_count = self._count + in_warmup.to(torch.int64)
        just_warm = in_warmup & (new_count == self.warmup_steps)
        n = new_count.clamp_min(1).to(torch.float64)
        init_mean = self._sum / n
        init_var = (self._sumsq / n - init_mean * init_mean).clamp_min(0)

        # EMA update after warm-up
        if self.spike_update == "clip":
            # ZClip's adaptive value mean + z_thr * s / (z / z_thr), with s the unfloored std
            excess = (x_safe - self._mean).clamp_min(1e-300)
            clipped = self._mean + self.z_threshold**2 * self._var.clamp_min(0).sqrt() * std / excess
            target = torch.where(spike, clipped, x_safe)
        else:
            target = x_safe
        do_ema = warm & finite
        if self.spike_update == "skip":
            do_ema = do_ema & ~spike
        ema_mean = self.alpha * self._mean + (1 - self.alpha) * target
        ema_var = self.alpha * self._var + (1 - self.alpha) * (target - ema_mean) ** 2

        new_mean = torch.where(just_warm, init_mean, torch.where(do_ema, ema_mean, self._mean))
        new_var = torch.where(just_warm, init_var, torch.where(do_ema, ema_var, self._var))
        # level shift: a streak of spikes (non-finite and skipped values neither extend nor break it)
        zero = torch.zeros_like(self._streak)
        streak = torch.where(spike, self._streak + 1, torch.where(warm & finite, zero, self._streak))
        streak_sum = torch.where(spike, self._streak_sum + x_safe, torch.where(streak == 0, 0.0, self._streak_sum))
        if self.reanchor_steps is not None:
            shifted = streak >= self.reanchor_steps
            new_mean = torch.where(shifted, streak_sum / streak.clamp_min(1).to(torch.float64), new_mean)
            new_var = torch.where(shifted, self._var, new_var)
            streak = torch.where(shifted, zero, streak)
            streak_sum = torch.where(shifted, 0.0, streak_sum)
        self._mean, self._var = new_mean, new_var
        self._count = torch.where(warm, self._count + finite.to(torch.int64), new_count)
        self._streak, self._streak_sum = streak, streak_sum
        return z, spike, ~is_finite

    def update_float(self, value: float) -> tuple[float, bool, bool]:
        """:meth:`update` for a scalar stream on the host, in Python floats (same arithmetic, same results)."""
        if not self.on_host:
            raise RuntimeError("`update_float` needs a scalar detector on the CPU; use `update`.")
        if not math.isfinite(value):
            return 0.0, False, True
        if self.log_scale and value <= 0:
            return 0.0, False, False  # no scale information (see `update`)
        x = math.log(value) if self.log_scale else value
        if self._count < self.warmup_steps:
            self._sum += x
            self._sumsq += x * x
            self._count += 1
            if self._count == self.warmup_steps:
                self._mean = self._sum / self._count
                self._var = max(self._sumsq / self._count - self._mean * self._mean, 0.0)
            return 0.0, False, False
        std = self._std_float()
        z = (x - self._mean) / std
        spike = z > self.z_threshold
        self._count += 1
        if not spike:
            self._streak, self._streak_sum = 0, 0.0
        else:
            self._streak += 1
            self._streak_sum += x
            if self.reanchor_steps is not None and self._streak >= self.reanchor_steps:
                # a level shift: the baseline moves to the new level (the variance, the noise, is kept)
                self._mean = self._streak_sum / self._streak
                self._streak, self._streak_sum = 0, 0.0
                return z, True, False
        if spike and self.spike_update == "skip":
            return z, True, False
        target = x
        if spike and self.spike_update == "clip":
            excess = max(x - self._mean, 1e-300)
            target = self._mean + self.z_threshold**2 * math.sqrt(max(self._var, 0.0)) * std / excess
        self._mean = self.alpha * self._mean + (1 - self.alpha) * target
        self._var = self.alpha * self._var + (1 - self.alpha) * (target - self._mean) ** 2
        return z, spike, False

    def ratio_float(self, value: float) -> float:
        """``value`` over the baseline that will judge it, for a scalar stream on the host: ``value / exp(mean)`` on the
        log scale (0 for a zero, NaN for a negative or NaN value), ``value / mean`` on the linear scale (``inf`` where
        the mean is not positive). Call it before :meth:`update_float`; it means something only after the warm-up."""
        if not self.on_host:
            raise RuntimeError("`ratio_float` needs a scalar detector on the CPU.")
        if self.log_scale:
            if not value > 0:
                return 0.0 if value == 0 else math.nan
            return math.exp(min(math.log(value) - self._mean, 700.0))
        return value / self._mean if self._mean > 0 else math.inf

    def clip_value(self) -> Tensor:
        """The value at ``z = z_threshold`` in the input's units (``exp`` of it on the log scale): where a spiking
        value is clipped back to. Call it before :meth:`update` for the statistics that judged the value."""
        value = self.mean + self.z_threshold * self.std()
        return value.exp() if self.log_scale else value

    def state_dict(self) -> dict[str, Any]:
        as_tensor = (lambda v, dt: torch.tensor(v, dtype=dt)) if self.on_host else (lambda v, dt: v.cpu())
        return {
            "mean": as_tensor(self._mean, torch.float64),
            "var": as_tensor(self._var, torch.float64),
            "count": as_tensor(self._count, torch.int64),
            "sum": as_tensor(self._sum, torch.float64),
            "sumsq": as_tensor(self._sumsq, torch.float64),
            "streak": as_tensor(self._streak, torch.int64),
            "streak_sum": as_tensor(self._streak_sum, torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def get(key: str, dtype: torch.dtype) -> Any:
            value = torch.as_tensor(state.get(key, torch.zeros(self.shape)), dtype=dtype).reshape(self.shape)
            return value.item() if self.on_host else value.to(self.device)

        self._mean, self._var = get("mean", torch.float64), get("var", torch.float64)
        self._count = get("count", torch.int64)
        self._sum, self._sumsq = get("sum", torch.float64), get("sumsq", torch.float64)
        self._streak, self._streak_sum = get("streak", torch.int64), get("streak_sum", torch.float64)

    def to(self, device: torch.device | str) -> EMAZScore:
        """Move the state to ``device`` (in place) and return self."""
        state = self.state_dict()
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu" and self.shape == ()
        self.load_state_dict(state)
        return self
