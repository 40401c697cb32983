"""Stability thresholds of common optimizers, for the edge-of-stability ratio.

Gradient descent with step size ``lr`` on a quadratic diverges along an eigendirection whose curvature exceeds
``2 / lr``; heavy-ball momentum ``m`` moves the threshold to ``(2 + 2m) / lr`` (Cohen et al. 2021, "Gradient Descent
on Neural Networks Typically Occurs at the Edge of Stability", ICLR). For Adam/AdamW the relevant quantity is the
*preconditioned* sharpness ``lambda_max(P^-1/2 H P^-1/2)`` with ``P = sqrt(v / (1 - beta2^t)) + eps``, compared with
``(2 + 2 beta1) / ((1 - beta1) lr)`` (38/lr for beta1 = 0.9; Cohen et al. 2022, "Adaptive Gradient Methods at the
Edge of Stability", arXiv 2207.14484).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_landscape.core.params import flatten


@dataclass(frozen=True)
class StabilityThreshold:
    """The curvature above which the optimizer's iteration is unstable.

    Attributes:
        threshold: the threshold (same units as the Hessian eigenvalues, or as the preconditioned ones).
        optimizer: ``"sgd"`` or ``"adam"``.
        preconditioned: compare the threshold with the preconditioned sharpness (Adam) instead of the sharpness.
        lr: the learning rate read from the optimizer.
        formula: a human-readable formula, for logs.
    """

    threshold: float
    optimizer: str
    preconditioned: bool
    lr: float
    formula: str


def _param_group(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> dict | None:
    wanted = {id(p) for p in params.values()}
    for group in optimizer.param_groups:
        if any(id(p) in wanted for p in group["params"]):
            return group
    return None


def stability_threshold(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> StabilityThreshold | None:
    """Threshold for SGD (with or without momentum), Adam and AdamW; ``None`` for other optimizers or when the
    selected parameters are not in ``optimizer``. Uses the param group holding the first selected parameter."""
    group = _param_group(optimizer, params)
    if group is None:
        return None
    lr = float(group["lr"])
    if lr <= 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(group.get("momentum", 0.0) or 0.0)
        return StabilityThreshold((2.0 + 2.0 * momentum) / lr, "sgd", False, lr, f"(2+2*{momentum:g})/{lr:g}")
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        beta1 = float(group["betas"][0])
        value = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
        return StabilityThreshold(value, "adam", True, lr, f"(2+2*{beta1:g})/((1-{beta1:g})*{lr:g})")
    return None


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> Tensor | None:
    """Flat ``P = sqrt(v / (1 - beta2^t)) + eps`` over ``params`` from Adam's state, or ``None`` before its first
    step (no second-moment estimate exists yet)."""
    group = _param_group(optimizer, params)
    if group is None:
        return None
    beta2, eps = float(group["betas"][1]), float(group["eps"])
    parts = []
    for p in params.values():
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        step = float(state["step"])
        v_hat = state["exp_avg_sq"].to(p.dtype) / (1.0 - beta2**step)
        parts.append(v_hat.sqrt() + eps)
    return flatten(parts)
