"""Divergence: a sustained rise of a positive series (the loss, the gradient norm) over its own recent best.

A spike detector is not a divergence detector: an EMA z-score adapts to a gradual rise (on a nanoGPT warmed up to a
too-high learning rate the loss climbed 20x over a hundred steps and the z-score never passed 3). This rule compares
the series' *slow level* with the *lowest level it reached recently*:

- level: ``m`` is an average of ``y = log(x)``; the first values are averaged (``m += w (y - m) / k``, ``k`` the
  summed weights), later ones enter an EMA of time constant ``time_constant`` steps
  (``m += (1 - (1 - 1/time_constant) ** w) d``); each value's move ``d = y - m`` is capped at ``log(max_step_ratio)``
  either way, so a single corrupted batch (a 100x loss) moves the level by at most that factor over
  ``time_constant``, while a rise that lasts moves it all the way. ``w`` is the value's weight: its batch size over
  the usual batch size, so the one-sample remainder batch at an epoch end barely counts;
- best: the lowest level over the last ``horizon`` updates, from the moment ``warmup`` weighted values are in (before
  that the level is only a running mean of a few values);
- noise: the level's own standard deviation ``s = sigma / sqrt(2 time_constant - 1)`` (that of an EMA of white noise),
  with ``sigma^2`` an EMA over ``10 time_constant`` steps of the squared step-to-step change of ``y`` over ``sqrt(2)``
  (capped like the moves): a trend barely changes it, so a rise does not hide behind its own growth;
- ``divergence`` fires when ``m - best > log(ratio) + noise_sigmas * s``, once; it re-arms when the excess is back
  below half of that.

In one sentence: *the loss's slow level (log scale, ~``time_constant`` steps, batch-size weighted, each step's move
capped) stands more than ``ratio``x, plus ``noise_sigmas`` of its own standard deviations, above its lowest point of
the last ``horizon`` steps.* Falling series, plateaus and noise do not fire: a falling level is its own best, and the
minimum of a noisy level sits a few of its standard deviations below it (that is what the noise term absorbs: the
one-sample remainder batches and the memorised, very noisy late losses of the healthy controls in
``benchmarks/grad_spikes.py --divergence`` otherwise fired).

Pure Python floats, state of primitives (``state_dict``); torch is not needed.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from lightning_landscape.core._validation import check_float, check_int


class DivergenceRule:
    """Slow level of ``log(x)`` against its lowest value over a recent horizon (see the module docstring).

    Args:
        ratio: the rise of the level over its recent best that fires (``> 1``).
        time_constant: EMA time constant of the level, in (weighted) steps.
        horizon: how many updates back the best level is looked for.
        warmup: weighted values averaged before the best level is tracked (default: ``time_constant``).
        max_step_ratio: the most one value can move the level's input (a factor, ``> 1``).
        noise_sigmas: how many of the level's standard deviations are added to ``log(ratio)``.

    Raises:
        ValueError / TypeError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        ratio: float = 1.15,
        time_constant: float = 7.0,
        horizon: int = 1000,
        warmup: float | None = None,
        max_step_ratio: float = 2.0,
        noise_sigmas: float = 6.0,
    ) -> None:
        self.ratio = check_float("ratio", ratio, minimum=1.0, strict_minimum=True)
        self.time_constant = check_float("time_constant", time_constant, minimum=1.0)
        self.horizon = check_int("horizon", horizon, minimum=1)
        self.warmup = self.time_constant if warmup is None else check_float("warmup", warmup, minimum=0.0)
        self.max_step_ratio = check_float("max_step_ratio", max_step_ratio, minimum=1.0, strict_minimum=True)
        self.noise_sigmas = check_float("noise_sigmas", noise_sigmas, minimum=0.0)
        self._decay = 1.0 - 1.0 / self.time_constant
        self._noise_decay = 1.0 - 1.0 / (10.0 * self.time_constant)
        self._level_std = 1.0 / math.sqrt(2.0 * self.time_constant - 1.0)
        self._cap = math.log(self.max_step_ratio)
        self._threshold = math.log(self.ratio)
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.level = math.nan  # log scale
        self.previous = math.nan  # the last log value
        self.noise = 0.0  # EMA of half the squared step-to-step change (sigma^2 of white noise)
        self.weight = 0.0
        self.updates = 0
        self.armed = True
        # (update index, level) with increasing levels: the front is the minimum of the window (a monotone queue)
        self._window: deque[tuple[int, float]] = deque()

    @property
    def best(self) -> float:
        """The lowest level (log scale) of the last ``horizon`` updates; NaN before the warm-up is done."""
        return self._window[0][1] if self._window else math.nan

    @property
    def threshold(self) -> float:
        """The excess (log scale) over the best level that fires: ``log(ratio) + noise_sigmas * s``."""
        return self._threshold + self.noise_sigmas * math.sqrt(self.noise) * self._level_std

    @property
    def rise(self) -> float:
        """``exp(level - best)``: how far the level stands above its recent best (NaN before warm-up)."""
        return math.exp(self.level - self.best) if self._window else math.nan

    def update(self, value: float, weight: float = 1.0) -> bool:
        """Feed one value (> 0; others are ignored) with its weight in (0, 1]; True exactly when the rule fires."""
        if not (math.isfinite(value) and value > 0 and weight > 0):
            return False
        y = math.log(value)
        self.weight += weight
        if self.weight == weight:  # the first value
            self.level = y
        else:
            move = min(max(y - self.level, -self._cap), self._cap)
            rate = max(1.0 - self._decay**weight, weight / self.weight)
            self.level += rate * move
            # the step-to-step change over sqrt(2) has the noise's spread (a trend barely adds to it), capped like the
            # moves: then it estimates the spread of what enters the level
            change = min(abs(y - self.previous) / math.sqrt(2.0), self._cap)
            noise_rate = max(1.0 - self._noise_decay**weight, weight / (self.weight - weight))
            self.noise += noise_rate * (change * change - self.noise)
        self.previous = y
        self.updates += 1
        if self.weight < self.warmup:
            return False
        window = self._window
        while window and window[-1][1] >= self.level:
            window.pop()
        window.append((self.updates, self.level))
        while window[0][0] <= self.updates - self.horizon:
            window.popleft()
        excess = self.level - window[0][1]
        threshold = self.threshold
        if self.armed and excess > threshold:
            self.armed = False
            return True
        if not self.armed and excess < threshold / 2:
            self.armed = True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "previous": self.previous,
            "noise": self.noise,
            "weight": self.weight,
            "updates": self.updates,
            "armed": self.armed,
            "window": [list(item) for item in self._window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level = float(state.get("level", math.nan))
        self.previous = float(state.get("previous", math.nan))
        self.noise = float(state.get("noise", 0.0))
        self.weight = float(state.get("weight", 0.0))
        self.updates = int(state.get("updates", 0))
        self.armed = bool(state.get("armed", True))
        self._window = deque((int(i), float(v)) for i, v in state.get("window", []))
