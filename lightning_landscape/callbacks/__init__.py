"""Lightning callbacks: thin glue from Lightning hooks to :mod:`lightning_landscape.core`."""

from lightning_landscape.callbacks._base import LandscapeAlertError, LandscapeCallback
from lightning_landscape.callbacks.bundle import LandscapeMonitor
from lightning_landscape.callbacks.connectivity import ModeConnectivityMonitor
from lightning_landscape.callbacks.grad_spikes import GradientSpikeMonitor
from lightning_landscape.callbacks.hessian import HessianMonitor
from lightning_landscape.callbacks.logits import LogitMonitor
from lightning_landscape.callbacks.rank import EffectiveRankMonitor

__all__ = [
    "EffectiveRankMonitor",
    "GradientSpikeMonitor",
    "HessianMonitor",
    "LandscapeAlertError",
    "LandscapeCallback",
    "LandscapeMonitor",
    "LogitMonitor",
    "ModeConnectivityMonitor",
]
