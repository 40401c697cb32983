"""The loss a measurement evaluates: the user's ``loss_fn`` or ``training_step``, checked to be an attached scalar."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_landscape.core.hvp import check_loss

LossFn = Callable[[pl.LightningModule, Any], Tensor]
#: The annotation of ``loss_fn`` arguments: any return annotation (jsonargparse rejects a function given by import
#: path whose return annotation is not the declared one, and most loss functions have none).
UserLossFn = typing.Callable[[pl.LightningModule, Any], Any]


def _training_step_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    output = module.training_step(batch, 0)
    if isinstance(output, dict):
        if "loss" not in output:
            raise TypeError(
                "`loss_fn` is None, so `training_step` is used as the loss, but it returned a dict without a 'loss' "
                f"key (keys: {sorted(output)}); pass `loss_fn=lambda module, batch: ...`."
            )
        output = output["loss"]
    if not isinstance(output, Tensor):
        raise TypeError(
            "`loss_fn` is None, so `training_step` is used as the loss, but it returned "
            f"{type(output).__name__}; it must return a Tensor or a dict with 'loss', or pass `loss_fn`."
        )
    return _check_attached(check_loss(output), "`training_step` (used as the loss because `loss_fn` is None)")


def _check_attached(loss: Tensor, source: str) -> Tensor:
    # With gradients enabled a measurement differentiates the loss; a detached one (`.item()`, `.detach()`, a loss
    # built under `torch.no_grad()`) would fail deep inside autograd without naming what returned it.
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise TypeError(
            f"{source} must return a loss attached to the autograd graph of the model's parameters, got a tensor "
            "without grad_fn (was it detached, rebuilt from `.item()`, or computed under `torch.no_grad()`?)."
        )
    return loss


def _user_loss(loss_fn: LossFn) -> LossFn:
    def checked(module: pl.LightningModule, batch: Any) -> Tensor:
        return _check_attached(check_loss(loss_fn(module, batch), name="loss_fn"), "`loss_fn`")

    return checked


def resolve_loss(loss_fn: Any, pl_module: pl.LightningModule, owner: str) -> LossFn:
    """The loss used for measurements (the user's ``loss_fn`` or ``training_step``); ``owner`` names the monitor."""
    if loss_fn is not None:
        return _user_loss(loss_fn)
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"{owner}: `loss_fn` must be given when the LightningModule uses manual optimization "
            "(its training_step steps the optimizer and cannot serve as a loss function); pass "
            "`loss_fn=lambda module, batch: ...` (to LandscapeMonitor, or in this part's dict)."
        )
    return _training_step_loss
