"""Forward-pass signals of an imminent blow-up: attention logits, the output log-partition, spectral alignment.

Pure PyTorch (no Lightning). :class:`LogitProbe` hooks a model, and every forward pass run inside it adds to the
statistics; the functions below are the per-tensor definitions, each tested against a dense float64 reference.

- **Attention logits** (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
  instabilities"; Dehghani et al. 2023): ``s = q k^T / sqrt(d_head)`` for every head of every
  ``nn.MultiheadAttention``, recomputed from the module's own projection weights and inputs. Their uncontrolled
  growth saturates the softmax (attention entropy collapses) and precedes divergence; qk-layernorm prevents it.
- **Output log-partition** ``log Z = logsumexp(logits)`` of the output layer, per position (Wortsman et al.'s
  "output logit divergence", which z-loss counters): drifting far from where it started means the logits are
  diverging in magnitude even while the loss still looks fine.
- **Spectral alignment** (Qiu et al. 2025, arXiv 2510.04202): for a linear layer ``y = W x`` with top right singular
  vector ``v1``, the sign of ``v1 . x`` per input row. A healthy layer sees both signs; a collapse of this sign
  diversity onto one sign (majority fraction -> 1) is reported as an early predictor of divergence. The fraction
  is invariant to the sign ambiguity of ``v1`` (and equals the fraction for ``u1 . W x``, since ``u1^T W = s1 v1^T``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.core.attention import mha_logits


# ----------------------------------------------------------------------------------------------- attention
def _mha_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
    query = args[0] if len(args) > 0 else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    return query, key


def attention_logits(module: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """The pre-softmax attention logits ``q k^T / sqrt(d_head)`` of ``module`` as ``(batch, heads, L, S)``
    (detached; ``float64`` for ``float64`` inputs, ``float32`` otherwise).

    Recomputed from ``in_proj_weight`` (or ``q_proj_weight``/``k_proj_weight``) and the biases, exactly as
    ``nn.MultiheadAttention`` projects them. ``add_bias_kv``'s extra key is not included. Unbatched inputs are
    ``(L, E)`` whatever ``batch_first`` says (batch 1 in the result).
    """
    if query.dim() == 3 and module.batch_first:  # (B, L, E) -> (L, B, E), the layout of the functional form
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    return mha_logits(
        query,
        key,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        not module._qkv_same_embed_dim,
        module.q_proj_weight,
        module.k_proj_weight,
    )


def allowed_positions(
    logits: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    """Boolean ``(batch, heads, L, S)``: which logits the softmax sees (``True`` in a bool mask means *masked*, as in
    ``nn.MultiheadAttention``; ``-inf`` in a float mask likewise)."""
    batch, heads, length, source = logits.shape
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if attn_mask is not None:
        blocked = attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
        blocked = blocked.reshape(-1, heads, length, source) if blocked.dim() == 3 else blocked
        allowed = allowed & ~blocked
    elif is_causal:
        allowed = allowed & torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
    if key_padding_mask is not None:
        blocked = key_padding_mask if key_padding_mask.dtype == torch.bool else torch.isneginf(key_padding_mask)
        allowed = allowed & ~blocked.reshape(batch, 1, 1, source)
    return allowed


def _with_additive_masks(logits: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
    """Add float masks' finite entries (additive biases such as ALiBi) to the logits: the softmax's real input."""
    batch, heads, length, source = logits.shape
    if attn_mask is not None and attn_mask.is_floating_point():
        bias = attn_mask.masked_fill(torch.isneginf(attn_mask), 0.0).to(logits.dtype)
        logits = logits + (bias.reshape(-1, heads, length, source) if bias.dim() == 3 else bias)
    if key_padding_mask is not None and key_padding_mask.is_floating_point():
        bias = key_padding_mask.masked_fill(torch.isneginf(key_padding_mask), 0.0).to(logits.dtype)
        logits = logits + bias.reshape(batch, 1, 1, source)
    return logits


def attention_statistics(logits: Tensor, allowed: Tensor) -> tuple[float, float, int]:
    """(maximum logit, summed softmax entropy in nats, number of query rows) over the allowed positions.

    Rows with no allowed key (fully masked) are skipped. Entropy is that of the softmax over each query's allowed
    keys: ``log S`` for uniform attention, ``0`` for attention on one key.
    """
    logits = logits.detach().double()
    masked = logits.masked_fill(~allowed, -math.inf)
    has_key = allowed.any(-1)
    if not bool(has_key.any()):
        return -math.inf, 0.0, 0
    maximum = float(masked.amax(-1)[has_key].max())
    log_p = torch.log_softmax(masked[has_key], dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
    return maximum, float(entropy.sum()), int(has_key.sum())


# ------------------------------------------------------------------------------------------- output logits
def log_partition(logits: Tensor) -> Tensor:
    """``log Z = logsumexp(logits, -1)`` per position, in float64 (shape ``logits.shape[:-1]``)."""
    return torch.logsumexp(logits.detach().double(), dim=-1)


def softmax_saturated(logits: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Boolean per row (shape ``logits.shape[:-1]``): whether the row's largest softmax probability, computed in
    ``dtype`` (default: the logits' own), rounds to exactly 1.

    This is softmax collapse (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"): the other classes'
    ``exp(z_j - z_max)`` sum to less than half a unit in the last place of 1 (a gap of about 16.6 nats in float32,
    36.7 in float64), so ``logsumexp`` equals the top logit, the cross-entropy of a row whose target is its top class
    is exactly 0, and so is that loss's gradient with respect to the target logit (``softmax - onehot``; the other
    components are below ``2^-24`` in float32). Such rows stop teaching the model. A row whose top class is *not* its
    target also counts (its gradient is the largest there is): on training data after memorisation the two agree.
    Non-finite entries count as 0 (a row of ``nan`` is not saturated).
    """
    wide = logits.detach().to(dtype or logits.dtype)
    wide = wide.masked_fill(~torch.isfinite(wide), 0.0)
    return torch.softmax(wide, dim=-1).amax(-1) == 1


# ---------------------------------------------------------------------------------------- spectral alignment
def top_right_singular_vector(
    weight: Tensor, start: Tensor | None = None, iterations: int = 20, tol: float = 1e-4
) -> tuple[Tensor, float]:
    """Top right singular vector ``v1`` (unit, float64) of a matrix and its singular value, by power iteration on
    ``W^T W`` from ``start`` (a warm start from the previous measurement converges in a few iterations).

    Stops when the vector moves by less than ``tol`` (2-norm) in one iteration, or after ``iterations``. The sign is
    fixed (the largest-magnitude entry is positive) so successive measurements compare; the alignment fraction does
    not depend on it.
    """
    w = weight.detach().double().flatten(1)
    if start is None or start.shape != (w.shape[1],) or not bool(torch.isfinite(start).all()):
        generator = torch.Generator().manual_seed(w.shape[1])
        start = torch.randn(w.shape[1], generator=generator, dtype=torch.float64)
    v = start.to(device=w.device, dtype=torch.float64)
    v = v / v.norm().clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(iterations):
        new = w.T @ (w @ v)
        norm = new.norm()
        if norm == 0:
            break
        new = new / norm
        # compare up to sign: W^T W has a positive top eigenvalue, so the iteration itself never flips the sign
        moved = float((new - v).norm())
        v = new
        if moved <= tol:
            break
    if v[v.abs().argmax()] < 0:
        v = -v
    return v, float((w @ v).norm())


def sign_counts(inputs: Tensor, direction: Tensor) -> tuple[int, int]:
    """(#rows with ``x . v > 0``, #rows with ``x . v < 0``) for the rows ``x`` of ``inputs`` (``(N, d)``)."""
    projection = inputs.detach().double() @ direction.to(device=inputs.device, dtype=torch.float64)
    return int((projection > 0).sum()), int((projection < 0).sum())


def majority_sign_fraction(positive: int, negative: int) -> float:
    """``max(#pos, #neg) / (#pos + #neg)`` in [0.5, 1]; nan with no non-zero projection."""
    total = positive + negative
    return max(positive, negative) / total if total else math.nan


# --------------------------------------------------------------------------------------------------- probe
@dataclass
class AttentionSummary:
    maximum: float = -math.inf
    entropy_sum: float = 0.0
    rows: int = 0

    @property
    def mean_entropy(self) -> float:
        return self.entropy_sum / self.rows if self.rows else math.nan


@dataclass
class OutputSummary:
    log_z_sum: float = 0.0
    count: int = 0
    max_abs_logit: float = 0.0

    @property
    def mean_log_partition(self) -> float:
        return self.log_z_sum / self.count if self.count else math.nan


@dataclass
class AlignmentSummary:
    positive: int = 0
    negative: int = 0

    @property
    def fraction(self) -> float:
        return majority_sign_fraction(self.positive, self.negative)


@dataclass
class LogitStatistics:
    """What a :class:`LogitProbe` collected over its forward passes (local to this process)."""

    attention: dict[str, AttentionSummary] = field(default_factory=dict)
    output: OutputSummary | None = None
    alignment: dict[str, AlignmentSummary] = field(default_factory=dict)
    non_finite: list[str] = field(default_factory=list)


@contextmanager
def LogitProbe(  # a context manager that reads as a class
    attention: dict[str, nn.MultiheadAttention],
    output: tuple[str, nn.Module] | None,
    alignment: dict[str, tuple[nn.Linear, Tensor]],
) -> Iterator[LogitStatistics]:
    """Hook the given modules for the forward passes run inside the ``with`` block; yield the statistics.

    Args:
        attention: ``{name: nn.MultiheadAttention}`` whose logits are recomputed from their inputs.
        output: ``(name, module)`` whose output (last dim = classes/vocabulary) gives ``log Z``; or ``None``.
        alignment: ``{name: (linear, v1)}``: the sign of ``v1 . x`` for every input row ``x`` of each layer.

    Hooks never change a module's inputs or outputs, and all are removed on exit, even after an error.
    """
    stats = LogitStatistics()
    handles = []

    def check(name: str, tensor: Tensor) -> bool:
        if not bool(torch.isfinite(tensor).all()):
            stats.non_finite.append(name)
            return False
        return True

    def attention_hook(name: str):
        def hook(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            query, key = _mha_inputs(args, kwargs)
            if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested:
                return
            with torch.no_grad():
                logits = attention_logits(module, query, key)
                if not check(name, logits):
                    return
                attn_mask, padding = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
                allowed = allowed_positions(logits, attn_mask, padding, bool(kwargs.get("is_causal")))
                logits = _with_additive_masks(logits, attn_mask, padding)
                maximum, entropy, rows = attention_statistics(logits, allowed)
            summary = stats.attention.setdefault(name, AttentionSummary())
            summary.maximum = max(summary.maximum, maximum)
            summary.entropy_sum += entropy
            summary.rows += rows

        return hook

    def output_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
            if not isinstance(result, Tensor) or not result.is_floating_point() or not check(name, result):
                return
            log_z = log_partition(result)
            summary = stats.output if stats.output is not None else OutputSummary()
            stats.output = summary
            summary.log_z_sum += float(log_z.sum())
            summary.count += log_z.numel()
            summary.max_abs_logit = max(summary.max_abs_logit, float(result.detach().abs().max()))

        return hook

    def alignment_hook(name: str, direction: Tensor):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                return
            x = args[0].detach()
            if not check(name, x):
                return
            positive, negative = sign_counts(x.reshape(-1, x.shape[-1]), direction)
            summary = stats.alignment.setdefault(name, AlignmentSummary())
            summary.positive += positive
            summary.negative += negative

        return hook

    try:
        for name, module in attention.items():
            handles.append(module.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
        if output is not None:
            handles.append(output[1].register_forward_hook(output_hook(output[0])))
        for name, (module, direction) in alignment.items():
            handles.append(module.register_forward_pre_hook(alignment_hook(name, direction)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


__all__ = [
    "LogitProbe",
    "LogitStatistics",
    "allowed_positions",
    "attention_logits",
    "attention_statistics",
    "log_partition",
    "majority_sign_fraction",
    "sign_counts",
    "softmax_saturated",
    "top_right_singular_vector",
]
