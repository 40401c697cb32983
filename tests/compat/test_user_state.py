"""User state beside the weights: torchmetrics updated in ``training_step``, and failures inside a measurement."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchmetrics

from tests.compat._common import CORE_KEYS, check, fit, monitor
from tests.helpers.real_models import NanoGPT, TinyMLP


class MLPWithAccuracy(TinyMLP):
    """Updates a torchmetrics ``Accuracy`` in ``training_step`` and logs it per epoch (a common pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return torch.nn.functional.cross_entropy(logits, y)


def _metric_state(module: MLPWithAccuracy) -> tuple[int, float]:
    return module.train_acc._update_count, float(module.train_acc.compute())


def test_torchmetrics_state_untouched_by_the_default_loss():
    """With ``loss_fn=None`` measurements run ``training_step``: the metric must not see those extra updates."""
    plain, _, plain_log = fit(MLPWithAccuracy, max_steps=20)
    watched, _, watched_log = fit(MLPWithAccuracy, [monitor(every=3)], max_steps=20)
    assert _metric_state(watched) == _metric_state(plain)  # the unfinished second epoch (measured at step 18)
    epoch_values = [[m["train_acc"] for _, m in log.history if "train_acc" in m] for log in (plain_log, watched_log)]
    assert epoch_values[0], "train_acc was never logged"
    assert epoch_values[1] == epoch_values[0]


def test_torchmetrics_module_contract():
    check(MLPWithAccuracy, CORE_KEYS)


def _failing_loss(module, batch):
    raise RuntimeError("user loss failed")


def test_a_failing_measurement_does_not_end_fit():
    """An exception inside one part's measurement (here its ``loss_fn``) is reported, and training goes on."""
    mon = monitor(hessian={"every_n_steps": 10, "loss_fn": _failing_loss})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer, logger = fit(NanoGPT, [mon], max_steps=12)
    assert trainer.global_step == 12
    assert any("user loss failed" in str(w.message) or "hessian" in str(w.message).lower() for w in caught)
    assert "landscape/lmc/barrier" in logger.landscape(), "the other parts must keep measuring"


def test_a_failing_measurement_raises_with_strict():
    mon = monitor(hessian={"every_n_steps": 10, "loss_fn": _failing_loss}, strict=True)
    with pytest.raises(RuntimeError, match="user loss failed"):
        fit(NanoGPT, [mon], max_steps=12)
