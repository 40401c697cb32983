"""Alerts and the small stateful rules that raise them.

An :class:`Alert` is a frozen record of one early warning. Rules are pure state machines over a stream of values
(one value per measurement), with ``state_dict``/``load_state_dict`` of primitives, so a resumed run keeps them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_landscape.core._validation import check_float, check_int

ALERT_KINDS = (
    "non_finite",
    "grad_spike",
    "loss_spike",
    "grad_growth",
    "divergence",
    "attention_logit_growth",
    "logit_divergence",
    "softmax_collapse",
    "alignment_collapse",
    "edge_of_stability",
    "sharpness_growth",
    "rank_collapse",
    "barrier_rise",
)


@dataclass(frozen=True)
class Alert:
    """One early warning.

    Attributes:
        step: optimizer step (``trainer.global_step``) at which the condition was seen.
        kind: one of :data:`ALERT_KINDS`.
        source: the monitor that raised it (class name).
        metric: the logged key whose value triggered it.
        value: that value.
        threshold: the threshold it crossed.
        message: a sentence for humans: what happened and what it usually means.
    """

    step: int
    kind: str
    source: str
    metric: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (for checkpoints and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class ConsecutiveAboveRule:
    """Fires once when the value has stayed strictly above ``threshold`` for ``patience`` consecutive updates.

    With ``peak`` given to :meth:`update`, the streak must also have reached a value strictly above ``peak``
    (it fires at the first update where both hold). It re-arms when the value drops to or below the threshold,
    so a second excursion fires again.
    """

    def __init__(self, threshold: float, patience: int = 1) -> None:
        self.threshold = check_float("threshold", threshold)
        self.patience = check_int("patience", patience, minimum=1)
        self.streak = 0
        self.streak_max = -math.inf
        self.fired = False

    def update(self, value: float, peak: float | None = None) -> bool:
        """Feed one value; True exactly once per streak, when it reaches ``patience`` (and ``peak``, if given)."""
        if math.isfinite(value) and value > self.threshold:
            self.streak += 1
            self.streak_max = max(self.streak_max, value)
            ready = self.streak >= self.patience and (peak is None or self.streak_max > peak)
            if ready and not self.fired:
                self.fired = True
                return True
            return False
        self.streak, self.streak_max, self.fired = 0, -math.inf, False
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "streak_max": self.streak_max, "fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))
        self.streak_max = float(state.get("streak_max", -math.inf))
        # checkpoints from before `fired` existed: the rule had fired exactly when the streak reached patience
        self.fired = bool(state.get("fired", self.streak >= self.patience))


class RelativeJumpRule:
    """Fires when a positive value exceeds ``(1 + jump)`` times the previous value."""

    def __init__(self, jump: float) -> None:
        self.jump = check_float("jump", jump, minimum=0.0, strict_minimum=True)
        self.previous: float | None = None

    @property
    def threshold(self) -> float:
        """The value that would fire on the next update (``inf`` before the first value)."""
        return math.inf if self.previous is None else self.previous * (1.0 + self.jump)

    def update(self, value: float) -> bool:
        """Feed one value; True when it jumped by more than ``jump`` relative to the previous one."""
        if not math.isfinite(value):
            return False
        fired = self.previous is not None and self.previous > 0 and value > self.threshold
        self.previous = value
        return fired

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = state.get("previous")
        self.previous = None if previous is None else float(previous)


class DropFromMaxRule:
    """Fires when a value falls below ``(1 - fraction)`` times the maximum of the last ``window`` values
    (the current one included); re-arms once the value recovers above that level."""

    def __init__(self, fraction: float = 0.5, window: int = 5) -> None:
        self.fraction = check_float("fraction", fraction, minimum=0.0, maximum=1.0, strict_minimum=True)
        self.window = check_int("window", window, minimum=2)
        self.history: list[float] = []
        self.armed = True

    @property
    def threshold(self) -> float:
        """The level below which the next value fires (from the history so far)."""
        return (1.0 - self.fraction) * max(self.history) if self.history else -math.inf

    def update(self, value: float) -> bool:
        """Feed one value; True when it is a collapse relative to the recent maximum."""
        if not math.isfinite(value):
            return False
        self.history = [*self.history, value][-self.window :]
        collapsed = value < (1.0 - self.fraction) * max(self.history)
        fired = collapsed and self.armed
        self.armed = not collapsed
        return fired

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "armed": self.armed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(v) for v in state.get("history", [])]
        self.armed = bool(state.get("armed", True))
