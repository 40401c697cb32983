"""lightning-landscape: Lightning callbacks that watch the geometry of training.

Callbacks are re-exported lazily (PEP 562) so that ``import lightning_landscape.core`` never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_landscape.core._validation import LandscapeWarning
from lightning_landscape.core.alerts import Alert

__version__ = "0.1.0"

_LAZY = {
    "EffectiveRankMonitor": "lightning_landscape.callbacks.rank",
    "GradientSpikeMonitor": "lightning_landscape.callbacks.grad_spikes",
    "HessianMonitor": "lightning_landscape.callbacks.hessian",
    "LandscapeCallback": "lightning_landscape.callbacks._base",
    "LandscapeAlertError": "lightning_landscape.callbacks._base",
    "LandscapeMonitor": "lightning_landscape.callbacks.bundle",
    "LogitMonitor": "lightning_landscape.callbacks.logits",
    "ModeConnectivityMonitor": "lightning_landscape.callbacks.connectivity",
}

__all__ = ["Alert", "LandscapeWarning", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
