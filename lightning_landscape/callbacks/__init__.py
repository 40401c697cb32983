"""Lightning callbacks: thin glue from Lightning hooks to :mod:`lightning_landscape.core`."""

from lightning_landscape.callbacks._base import LandscapeAlertError, LandscapeCallback
from lightning_landscape.callbacks.grad_spikes import GradientSpikeMonitor
from lightning_landscape.callbacks.hessian import HessianMonitor

__all__ = ["GradientSpikeMonitor", "HessianMonitor", "LandscapeAlertError", "LandscapeCallback"]
