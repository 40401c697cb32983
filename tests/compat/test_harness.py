"""The suite's own checks can fail: an interfering callback, a missing key and an alert are each caught."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.compat._common import CORE_KEYS, check, monitor
from tests.helpers.real_models import TinyMLP


class DrawsRandomNumbers(pl.Callback):
    """Consumes the global RNG at every step: dropout masks then differ from the run without it."""

    def __init__(self) -> None:
        self.alerts, self.last_metrics = [], {"x": 1.0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.rand(1)


def test_interference_is_caught():
    with pytest.raises(AssertionError, match="training changed by the monitor"):
        check(lambda: TinyMLP(dropout=0.1), (), DrawsRandomNumbers)


def test_missing_key_is_caught():
    with pytest.raises(AssertionError, match=r"not logged: \['landscape/sharpness'\]"):
        check(TinyMLP, CORE_KEYS, lambda: monitor(hessian=False), unchanged=False)


def test_alert_is_caught():
    """An edge-of-stability threshold every run exceeds: the alert must be reported."""
    with pytest.raises(AssertionError, match="edge_of_stability alert"):
        check(
            TinyMLP,
            (),
            lambda: monitor(hessian={"every_n_steps": 5, "eos_threshold": 1e-6, "eos_patience": 1}),
            unchanged=False,
        )
