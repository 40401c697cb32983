"""Stability thresholds of common optimizers, for the edge-of-stability ratio.

Every threshold below is the linear-stability limit of the optimizer's iteration on a quadratic
``L(x) = x^T H x / 2`` with the optimizer's state (momentum coefficients, Adam's preconditioner, bias factors) held
fixed: along an eigendirection of curvature ``h`` the iteration is a linear recurrence, and it diverges exactly when
a root of its characteristic polynomial leaves the unit disk (Jury's conditions for ``z^2 + c_1 z + c_0``:
``|c_0| < 1`` and ``1 +- c_1 + c_0 > 0``). Cohen et al. 2021 ("Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", ICLR) and Cohen et al. 2022 ("Adaptive Gradient Methods at the Edge of
Stability", arXiv 2207.14484) compare these limits with the sharpness during training.

Derivations (``b`` momentum, ``d`` dampening, ``a = lr * h``; PyTorch's update rules):

* SGD, heavy ball (``buf = b buf + (1 - d) g``, ``x -= lr buf``): ``x_{t+1} - x_t = b (x_t - x_{t-1}) -
  (1 - d) a x_t``, so ``z^2 - (1 + b - (1 - d) a) z + b = 0``; ``1 - c_1 + c_0 > 0`` gives
  ``h < (2 + 2b) / ((1 - d) lr)`` (the other conditions hold for ``0 <= b < 1``). Plain SGD is ``b = d = 0``:
  ``2 / lr``.
* SGD, Nesterov (``x -= lr (g + b buf)``): ``z^2 - (1 + b - a - a b (1 - d)) z + b (1 - a) = 0``, and
  ``1 - c_1 + c_0 > 0`` gives ``h < (2 + 2b) / ((1 + b (2 - d)) lr)``: ``(2 + 2b) / ((1 + 2b) lr)`` for PyTorch,
  which requires ``d = 0`` (13.57 at ``lr = 0.1, b = 0.9``, against 38 for heavy ball).
* Adam/AdamW (``m = b1 m + (1 - b1) g``, ``x -= lr m / ((1 - b1^(t+1)) P)`` with ``P = sqrt(v / (1 - b2^t)) + eps``
  frozen): heavy ball with ``b = b1``, ``1 - d = (1 - b1) / (1 - b1^(t+1))`` in the metric ``P``, so the
  preconditioned sharpness ``lambda_max(P^-1/2 H P^-1/2)`` must stay below
  ``(2 + 2 b1) (1 - b1^(t+1)) / ((1 - b1) lr)``, where ``t`` is the number of steps taken (Adam's ``state["step"]``)
  and ``t + 1`` the step about to be taken. The bias factor ``1 - b1^(t+1)`` tends to 1 (38/lr for ``b1 = 0.9``);
  early in training it lowers the threshold (0.34 at ``t = 3``). With AMSGrad, ``P`` uses ``max_exp_avg_sq``.
  Entries whose second moment is still exactly 0 have never had a gradient: Adam does not move them, and the step
  that first gives them a gradient also gives them ``v = (1 - b2) g^2``, so the frozen ``P = eps`` there describes
  no step Adam takes; they are left out of the preconditioned operator (scale 0) instead of being divided by
  ``eps`` (which made the ratio 76-88 at steps 3-4 of a transformer whose ratio was 0.14 from step 6).
* Per-group learning rates (any of the above): ``x -= diag(lr) (...)``; with ``lr = lr_0 * s`` the iteration is the
  single-``lr_0`` one for the operator ``S^1/2 H S^1/2`` (``S = diag(s)``), so the stable quantity is
  ``lambda_max(S^1/2 M^-1/2 H M^-1/2 S^1/2)`` (``M = P`` for Adam, ``I`` for SGD) against the threshold at ``lr_0``.
  Parameters outside the optimizer, or at ``lr = 0``, do not move: scale 0. Groups must share the momentum
  hyper-parameters (else no single threshold exists and ``None`` is returned).

* Weight decay, coupled (SGD's and Adam's ``weight_decay``: ``g = grad + wd x``): on the quadratic the gradient is
  ``(H + wd I) x``, so every recurrence above holds with ``h + wd`` in place of ``h``. With one learning rate and
  one ``wd`` SGD's threshold on the sharpness is the one above minus ``wd``; in general (Adam, per-group learning
  rates or decays) the stable quantity is ``lambda_max(D (H + W) D) = lambda_max(D H D + W D^2)`` (``W`` the
  per-parameter decay) against the unchanged threshold: :func:`stability_shift` gives the diagonal ``W D^2``.
* Weight decay, decoupled (AdamW, or Adam with ``decoupled_weight_decay=True``: ``x <- (1 - lr wd) x - lr m / (bc
  P)``): with ``rho = 1 - lr wd`` and ``a = lr h (1 - b1) / bc`` (``h`` an eigenvalue of ``P^-1/2 H P^-1/2``,
  ``bc = 1 - b1^(t+1)``), ``x_{t+1} = (rho + b1 - a) x_t - b1 rho x_{t-1}``: ``z^2 - (rho + b1 - a) z + b1 rho =
  0``. ``|c_0| = b1 rho < 1`` and ``1 + c_1 + c_0 = (1 - rho)(1 - b1) + a > 0`` always hold; ``1 - c_1 + c_0 > 0``
  gives ``a < (1 + rho)(1 + b1)``, i.e. Adam's threshold times ``(1 + rho) / 2 = 1 - lr wd / 2`` (a 5e-6 change at
  AdamW's default ``wd = 0.01``, ``lr = 1e-3``). Exact when every selected group has the same ``lr * wd``;
  otherwise the smallest factor is used (the decay no longer commutes with the eigendirections).

Not modelled: the change of ``P`` between steps (Cohen et al. 2022 hold it fixed as well). Tests check every
formula against the largest stable learning rate found by bisection on quadratics (``tests/core/test_stability.py``).
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
        preconditioned: compare the threshold with the sharpness of the scaled operator ``D H D``
            (:func:`stability_scale`; Adam/AdamW, or SGD with per-group learning rates) instead of the sharpness.
        lr: the reference learning rate (of the group holding the first selected parameter).
        formula: a human-readable formula, for logs.
        step: optimizer steps taken (Adam's bias factor uses ``step + 1``), 0 for SGD.
        per_group: the selected parameters sit in groups with different learning rates.
        weight_decay: the reference group's ``weight_decay`` (coupled: already subtracted from an SGD threshold or
            in :func:`stability_shift`; decoupled: in the factor ``1 - lr wd / 2``).
        decoupled: the decay is decoupled (AdamW).
    """

    threshold: float
    optimizer: str
    preconditioned: bool
    lr: float
    formula: str
    step: int = 0
    per_group: bool = False
    weight_decay: float = 0.0
    decoupled: bool = False


def _param_group(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> dict | None:
    wanted = {id(p) for p in params.values()}
    for group in optimizer.param_groups:
        if any(id(p) in wanted for p in group["params"]):
            return group
    return None


def _groups_of(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> list[dict | None]:
    """The param group of each selected parameter (None where the optimizer does not hold it)."""
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return [owner.get(id(p)) for p in params.values()]


def _hyper(group: dict, kind: str) -> tuple:
    if kind == "sgd":
        return (
            float(group.get("momentum", 0.0) or 0.0),
            float(group.get("dampening", 0.0) or 0.0),
            bool(group.get("nesterov", False)),
        )
    return (float(group["betas"][0]), float(group["betas"][1]), float(group["eps"]), bool(group.get("amsgrad")))


def _adam_step(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> int:
    for p in params.values():
        state = optimizer.state.get(p, {})
        if "step" in state:
            return int(float(state["step"]))
    return 0


def stability_threshold(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> StabilityThreshold | None:
    """Threshold for SGD (momentum, dampening, Nesterov), Adam and AdamW (bias factor, AMSGrad); see the module
    docstring for the derivations.

    ``None`` for other optimizers, when no selected parameter is in ``optimizer``, when the reference learning rate
    is not positive, or when the selected parameters' groups differ in momentum hyper-parameters. With per-group
    learning rates the threshold is at the reference ``lr`` and applies to ``D H D`` (:func:`stability_scale`).
    """
    group = _param_group(optimizer, params)
    if group is None:
        return None
    lr = float(group["lr"])
    if lr <= 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        kind = "adam"
    else:
        return None
    groups = [g for g in _groups_of(optimizer, params) if g is not None]
    if any(_hyper(g, kind) != _hyper(group, kind) for g in groups):
        return None
    per_group = any(float(g["lr"]) != lr for g in groups) or len(groups) < len(params)
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    uniform_decay = all(float(g.get("weight_decay", 0.0) or 0.0) == wd for g in groups)
    if kind == "sgd":
        b, d, nesterov = _hyper(group, "sgd")
        if nesterov:
            value = (2.0 + 2.0 * b) / ((1.0 + b * (2.0 - d)) * lr)
            formula = f"(2+2*{b:g})/((1+{b:g}*(2-{d:g}))*{lr:g})"
        else:
            value = (2.0 + 2.0 * b) / ((1.0 - d) * lr) if d < 1.0 else float("inf")
            formula = f"(2+2*{b:g})/((1-{d:g})*{lr:g})"
        # coupled decay: the iteration sees H + W; one lr and one wd shift the sharpness's threshold by wd, else
        # the decay enters the operator D H D + W D^2 (stability_shift)
        scaled = per_group or not uniform_decay
        if wd and not scaled:
            value, formula = value - wd, f"{formula}-{wd:g}"
            if value <= 0:
                return None  # lr * wd beyond the limit: the decay alone diverges, no curvature is stable
        return StabilityThreshold(value, "sgd", scaled, lr, formula, 0, per_group, wd)
    beta1 = _hyper(group, "adam")[0]
    step = _adam_step(optimizer, params)
    bias = 1.0 - beta1 ** (step + 1)
    value = (2.0 + 2.0 * beta1) * bias / ((1.0 - beta1) * lr)
    formula = f"(2+2*{beta1:g})*(1-{beta1:g}^{step + 1})/((1-{beta1:g})*{lr:g})"
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    if decoupled and any(float(g.get("weight_decay", 0.0) or 0.0) for g in groups):
        # x <- (1 - lr wd) x - ...: the threshold times (1 + rho) / 2 (module docstring); the smallest over groups
        factor = min(1.0 - float(g["lr"]) * float(g.get("weight_decay", 0.0) or 0.0) / 2.0 for g in groups)
        if factor <= 0:
            return None
        value, formula = value * factor, f"{formula}*{factor:.6g}"
    return StabilityThreshold(value, "adam", True, lr, formula, step, per_group, wd, decoupled)


def stability_shift(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], scale: Tensor | None
) -> Tensor | None:
    """The diagonal ``W D^2`` that coupled weight decay adds to the scaled operator ``D H D`` (module docstring).

    ``scale`` is ``D`` from :func:`stability_scale`; ``None`` when there is no scaled operator, the decay is
    decoupled (AdamW: it is in the threshold instead) or zero. ``W`` is each parameter's group ``weight_decay``
    (0 outside the optimizer).
    """
    if scale is None or isinstance(optimizer, torch.optim.AdamW):
        return None
    owners = _groups_of(optimizer, params)
    decays = [0.0 if g is None else float(g.get("weight_decay", 0.0) or 0.0) for g in owners]
    if not any(decays) or any(g is not None and g.get("decoupled_weight_decay", False) for g in owners):
        return None
    w = torch.cat(
        [
            torch.full((p.numel(),), wd, dtype=scale.dtype, device=scale.device)
            for p, wd in zip(params.values(), decays, strict=True)
        ]
    )
    return w * scale.square()


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]) -> Tensor | None:
    """Flat ``P = sqrt(v / (1 - beta2^t)) + eps`` over ``params`` from Adam's state (``v = max_exp_avg_sq`` with
    AMSGrad), or ``None`` before its first step (no second-moment estimate exists yet). Entries whose ``v`` is still
    exactly 0 are ``inf`` (they have never had a gradient; see the module docstring), so ``P ** -0.5`` is 0 there."""
    group = _param_group(optimizer, params)
    if group is None:
        return None
    owners = _groups_of(optimizer, params)
    parts = []
    for p, owner in zip(params.values(), owners, strict=True):
        state = optimizer.state.get(p, {})
        if owner is None:  # not optimized: never moves
            parts.append(torch.full_like(p, float("inf")))
            continue
        if "exp_avg_sq" not in state:
            return None
        beta2, eps = float(owner["betas"][1]), float(owner["eps"])
        v = state["max_exp_avg_sq"] if owner.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
        step = float(state["step"])
        v = v.to(p.dtype)
        v_hat = v / (1.0 - beta2**step)
        parts.append(torch.where(v == 0, torch.full_like(v_hat, float("inf")), v_hat.sqrt() + eps))
    return flatten(parts)


def stability_scale(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], threshold: StabilityThreshold
) -> Tensor | None:
    """The flat diagonal ``D`` such that ``lambda_max(D H D)`` is compared with ``threshold.threshold``.

    ``None`` means the identity (plain SGD with one learning rate: the sharpness itself). Otherwise
    ``D = sqrt(s / M)`` with ``s = lr / threshold.lr`` per parameter (0 outside the optimizer) and ``M`` Adam's
    preconditioner (:func:`adam_preconditioner`, ``D = 0`` where it is ``inf``) or 1 for SGD. ``None`` also for Adam
    before its first step, when no preconditioner exists: check ``threshold.preconditioned`` to tell the two apart.
    """
    if not threshold.preconditioned:
        return None
    owners = _groups_of(optimizer, params)
    ratios = [
        torch.full((p.numel(),), 0.0 if g is None else float(g["lr"]) / threshold.lr, dtype=torch.float64)
        for p, g in zip(params.values(), owners, strict=True)
    ]
    s = torch.cat(ratios)
    if threshold.optimizer == "adam":
        preconditioner = adam_preconditioner(optimizer, params)
        if preconditioner is None:
            return None
        s = s.to(device=preconditioner.device, dtype=preconditioner.dtype) / preconditioner
    first = next(iter(params.values()))
    return s.to(device=first.device, dtype=first.dtype).sqrt()


__all__ = ["StabilityThreshold", "adam_preconditioner", "stability_scale", "stability_shift", "stability_threshold"]
