"""Attention logits read from the forward pass the model runs anyway, whatever implements its attention.

Pure PyTorch (no Lightning). :class:`AttentionCapture` is a :class:`torch.overrides.TorchFunctionMode`: while it is
active, every call of

- ``torch.nn.functional.scaled_dot_product_attention`` (nanoGPT, litgpt, HuggingFace ``attn_implementation="sdpa"``),
  with its ``scale``, ``attn_mask`` (boolean: ``True`` takes part; float: added), ``is_causal`` (top-left aligned
  lower triangle, as in PyTorch) and ``enable_gqa`` (key heads repeated ``H_q / H_k`` times) honoured;
- a softmax over the last dimension of a 4-D tensor ``(batch, heads, queries, keys)`` (``F.softmax``,
  ``torch.softmax``, ``Tensor.softmax``): "eager" attention such as HuggingFace's ``eager_attention_forward`` or
  nanoGPT's manual path. Its input *is* the pre-softmax logit with the masks already added; entries at or below
  half the dtype's most negative value (HuggingFace adds ``finfo.min``) or ``-inf`` count as masked;
- ``torch.nn.functional.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls): ``q k^T / sqrt(d)``
  recomputed from the projection weights passed to it, with ``attn_mask``/``key_padding_mask`` (boolean: ``True``
  is masked; float ``-inf`` likewise, finite values added) and ``is_causal`` honoured (``bias_k``'s extra key and
  ``add_zero_attn`` are not included);

is passed through unchanged (the same function on the same arguments: outputs, autograd graph and RNG are
untouched) and, beside it, under ``torch.no_grad()`` on detached inputs, the largest allowed pre-softmax logit, the
summed softmax entropy and the number of query rows with an allowed key are added to per-module accumulators that
stay on the device (0-d tensors; no host synchronisation until :meth:`AttentionCapture.result` is read). The
statistics are computed in ``float32`` (``float64`` for ``float64`` inputs).

"The module that made the call" is the innermost module of the watched model whose ``forward`` is running: global
forward pre-/post-hooks keep a stack while the capture is active (and only then). A call made outside every module
of the model is named ``"root"``.

Inside a ``__torch_function__`` handler the mode is off, so the calls made *inside* a captured function (the
softmax inside ``multi_head_attention_forward``, for instance) are not seen twice.

Not seen: attention kernels that never reach these Python-level functions (``flash_attn``'s own kernels,
xformers, a custom CUDA op), and a forward compiled by ``torch.compile`` (Dynamo traces the functions, the mode
does not run): callers detect both (nothing captured, or a compiled model) and say so.

Cost: one more ``q k^T`` per attention call (``batch x heads x L x S`` logits, materialised transiently), its
masked row maxima, the softmax entropy over the first ``entropy_samples`` batch rows (all by default), and the
Python dispatch of every torch call while active.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

ROOT = "root"

_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _stat_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ------------------------------------------------------------------------------------------------ logits
def sdpa_logits(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """(logits, allowed) of ``F.scaled_dot_product_attention(query, key, ..., attn_mask, is_causal, scale,
    enable_gqa)``: the softmax's input ``q k^T * scale + float mask`` and a boolean of the positions it attends to,
    broadcast to ``(..., H_q, L, S)``.

    ``scale`` defaults to ``1/sqrt(E)``; a boolean ``attn_mask`` is ``True`` where attention is allowed, a float one is
    added (``-inf`` entries, and entries at or below half the dtype's most negative value, mean masked); with
    ``enable_gqa`` each of the ``H_k`` key heads serves ``H_q / H_k`` consecutive query heads.
    """
    dtype = _stat_dtype(query, key)
    q, k = query.detach().to(dtype), key.detach().to(dtype)
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = (q * factor) @ k.transpose(-2, -1)  # scaling q: fewer elements than the logits
    length, source = logits.shape[-2], logits.shape[-1]
    allowed = torch.ones(length, source, dtype=torch.bool, device=logits.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        mask = attn_mask.detach()
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            allowed = allowed & ~_blocked(mask)
            logits = logits + mask.to(dtype).masked_fill(_blocked(mask), 0.0)
    return logits, allowed.expand_as(logits)


def _blocked(mask: Tensor) -> Tensor:
    """Float mask entries that mean "masked": ``-inf`` or at most half the dtype's most negative value."""
    return mask <= torch.finfo(mask.dtype).min / 2


def softmax_logits(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, allowed) of eager attention's ``softmax(scores, -1)``: the input itself, and which entries are not
    masked (``-inf`` or at most half the dtype's most negative value: the large negative values masks add)."""
    logits = scores.detach().to(_stat_dtype(scores))
    return logits, ~_blocked(scores.detach())


def mha_logits(
    query: Tensor,
    key: Tensor,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
) -> Tensor:
    """Pre-softmax logits ``q k^T / sqrt(d_head)`` as ``(batch, heads, L, S)`` from the arguments of
    ``F.multi_head_attention_forward``: ``query`` ``(L, N, E)`` or unbatched ``(L, E)``, ``key`` ``(S, N, E_k)`` or
    ``(S, E_k)``, projected exactly as that function projects them."""
    dtype = _stat_dtype(query, key)
    query, key = query.detach().to(dtype), key.detach().to(dtype)
    if query.dim() == 2:  # unbatched: (L, E) -> (L, 1, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    embed = query.shape[-1]
    head_dim = embed // num_heads
    if use_separate_proj_weight:
        w_q, w_k = q_proj_weight, k_proj_weight
    else:
        w_q, w_k = in_proj_weight[:embed], in_proj_weight[embed : 2 * embed]
    b_q = b_k = None
    if in_proj_bias is not None:
        b_q, b_k = in_proj_bias[:embed], in_proj_bias[embed : 2 * embed]
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    q = F.linear(query, cast(w_q), cast(b_q))  # (L, N, E)
    k = F.linear(key, cast(w_k), cast(b_k))
    length, batch, source = q.shape[0], q.shape[1], k.shape[0]
    q = q.permute(1, 0, 2).reshape(batch, length, num_heads, head_dim).transpose(1, 2)
    k = k.permute(1, 0, 2).reshape(batch, source, num_heads, head_dim).transpose(1, 2)
    return q @ k.transpose(-2, -1) / math.sqrt(head_dim)


def mha_allowed(
    logits: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """(logits with finite float-mask entries added, allowed) for ``nn.MultiheadAttention``'s masks (boolean:
    ``True`` is masked; float: ``-inf`` is masked, finite values are added). ``attn_mask`` is ``(L, S)`` or
    ``(N * heads, L, S)``; ``key_padding_mask`` is ``(N, S)`` or unbatched ``(S,)``."""
    _, heads, length, source = logits.shape
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if attn_mask is not None:
        mask = attn_mask.detach()
        mask = mask.reshape(-1, heads, length, source) if mask.dim() == 3 else mask
        if mask.dtype == torch.bool:
            allowed = allowed & ~mask
        else:
            allowed = allowed & ~torch.isneginf(mask)
            logits = logits + mask.masked_fill(torch.isneginf(mask), 0.0).to(logits.dtype)
    elif is_causal:
        allowed = allowed & torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
    if key_padding_mask is not None:
        mask = key_padding_mask.detach().reshape(-1, 1, 1, source)
        if mask.dtype == torch.bool:
            allowed = allowed & ~mask
        else:
            allowed = allowed & ~torch.isneginf(mask)
            logits = logits + mask.masked_fill(torch.isneginf(mask), 0.0).to(logits.dtype)
    return logits, allowed


# -------------------------------------------------------------------------------------------- statistics
def attention_sums(
    logits: Tensor, allowed: Tensor, entropy_samples: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(maximum allowed logit, summed softmax entropy in nats, number of query rows in that sum, number of rows whose
    allowed logits are not all finite), as 0-d tensors on the logits' device: no host synchronisation.

    The maximum and the non-finite count are over every row; the entropy (and its row count) over the first
    ``entropy_samples`` entries of the leading (batch) dimension (``None``: all): the entropy is a mean, which a
    subsample estimates, and it is most of the cost. It is that of the softmax over each query's allowed keys
    (``log S`` for uniform attention, ``0`` for attention on one key), computed as ``log Z - sum(e * (s - m)) / Z``
    with ``m`` the row maximum and ``e = exp(s - m)``; fully masked rows are skipped (maximum ``-inf`` when every
    row is). A ``nan`` or ``+inf`` allowed logit makes its row's maximum non-finite, which is how non-finite logits
    are counted without another pass over them.
    """
    allowed = allowed.expand_as(logits)
    masked = logits.masked_fill(~allowed, -math.inf)
    row_max = masked.amax(-1, keepdim=True) if masked.shape[-1] else masked.sum(-1, keepdim=True) - math.inf
    peak = row_max.squeeze(-1)
    has_key_all = (peak > -math.inf) | peak.isnan()  # nan rows count as rows (and as non-finite)
    maximum = peak.amax() if peak.numel() else logits.new_tensor(-math.inf)
    non_finite = (has_key_all & ~torch.isfinite(peak)).sum()
    if entropy_samples is not None and logits.dim() > 2:
        masked, allowed = masked[:entropy_samples], allowed[:entropy_samples]
        row_max, has_key_all = row_max[:entropy_samples], has_key_all[:entropy_samples]
    has_key = has_key_all
    finite_max = torch.where(has_key.unsqueeze(-1), row_max, torch.zeros_like(row_max))
    shifted = (masked - finite_max).masked_fill(~allowed, 0.0)
    e = shifted.exp().masked_fill(~allowed, 0.0)
    z = e.sum(-1)
    entropy = torch.log(z) - (e * shifted).sum(-1) / z
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    entropy = torch.where(has_key, entropy, zero)
    return maximum, entropy.sum(), has_key.sum().to(logits.dtype), non_finite.to(logits.dtype)


@dataclass
class AttentionSums:
    """Running per-module sums, 0-d tensors on the device."""

    maximum: Tensor
    entropy_sum: Tensor
    rows: Tensor
    non_finite: Tensor
    calls: int = 0

    def add(self, maximum: Tensor, entropy: Tensor, rows: Tensor, non_finite: Tensor) -> None:
        self.maximum = torch.maximum(self.maximum, maximum.to(self.maximum.dtype))
        self.entropy_sum = self.entropy_sum + entropy.to(self.entropy_sum.dtype)
        self.rows = self.rows + rows.to(self.rows.dtype)
        self.non_finite = self.non_finite + non_finite.to(self.non_finite.dtype)
        self.calls += 1


# ---------------------------------------------------------------------------------------------- capture
class AttentionCapture(TorchFunctionMode):
    """Read the attention logits of every attention call made while active (see the module docstring).

    Args:
        names: ``{module: qualified name}`` of the watched model (its ``named_modules()``); the innermost running
            one names a call (``"root"`` outside all of them).
        include: ``include(name) -> bool``: whether a call by that module is read (others pass through untouched).
        entropy_samples: average the entropy over the first this many batch rows of each call (``None``: all); the
            maximum is always over every row (see :func:`attention_sums`).

    Use as a context manager (``with AttentionCapture(...) as capture:``) or with :meth:`start`/:meth:`stop` when
    entry and exit happen in different callbacks; :attr:`sums` holds ``{name: AttentionSums}``.
    """

    def __init__(
        self,
        names: dict[nn.Module, str],
        include: Callable[[str], bool] | None = None,
        entropy_samples: int | None = None,
    ) -> None:
        super().__init__()
        self._names = {id(m): n for m, n in names.items()}
        self._include = include
        self.entropy_samples = entropy_samples
        #: Host seconds spent reading calls (on an asynchronous device: launching the reads), for budget ledgers.
        self.seconds = 0.0
        self.sums: dict[str, AttentionSums] = {}
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._active = False
        self._cache: dict[str, bool] = {}

    # -------------------------------------------------------------------------------------- module stack
    def _pre(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(id(module))
        if name is not None and self._stack and self._stack[-1] == name:
            self._stack.pop()

    def current(self) -> str:
        """Qualified name of the innermost running module of the model (``"root"`` outside all of them)."""
        return (self._stack[-1] or ROOT) if self._stack else ROOT

    # ------------------------------------------------------------------------------------- activation
    def start(self) -> AttentionCapture:
        """Enter the mode and install the module-stack hooks (undo with :meth:`stop`)."""
        if self._active:
            return self
        self._stack.clear()
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        self.__enter__()
        self._active = True
        return self

    def stop(self) -> None:
        """Leave the mode and remove the hooks. Safe to call twice; raises if another mode entered after this one is
        still active (leaving would pop that one instead)."""
        if not self._active:
            return
        stack = torch.overrides._get_current_function_mode_stack()
        if not stack or stack[-1] is not self:
            raise RuntimeError(
                "AttentionCapture.stop: another TorchFunctionMode entered after the capture is still active; "
                "leave modes in reverse order."
            )
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.clear()
        self._active = False
        self.__exit__(None, None, None)

    @property
    def active(self) -> bool:
        return self._active

    # ---------------------------------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func in _SOFTMAX or func is F.multi_head_attention_forward:
            name = self.current()
            if self._wanted(name):
                started = time.perf_counter()
                with torch.no_grad():
                    read = self._read(func, args, kwargs)
                    if read is not None:
                        self._add(name, *read)
                self.seconds += time.perf_counter() - started
        return func(*args, **kwargs)

    def _wanted(self, name: str) -> bool:
        if self._include is None:
            return True
        if name not in self._cache:
            self._cache[name] = bool(self._include(name))
        return self._cache[name]

    def _read(self, func: Any, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_PARAMETERS, args, strict=False)) | kwargs
            query, key = bound.get("query"), bound.get("key")
            if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested:
                return None
            mask = bound.get("attn_mask")
            return sdpa_logits(
                query, key, mask, bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa"))
            )
        if func in _SOFTMAX:
            scores = args[0] if args else kwargs.get("input")
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if not isinstance(scores, Tensor) or scores.dim() != 4 or dim not in (-1, 3) or scores.is_nested:
                return None  # not (batch, heads, queries, keys) attention scores
            if not scores.is_floating_point():
                return None
            return softmax_logits(scores)
        bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
        query, key = bound["query"], bound["key"]
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.is_nested:
            return None
        logits = mha_logits(
            query,
            key,
            bound["num_heads"],
            bound["in_proj_weight"],
            bound.get("in_proj_bias"),
            bool(bound.get("use_separate_proj_weight", False)),
            bound.get("q_proj_weight"),
            bound.get("k_proj_weight"),
        )
        logits, allowed = mha_allowed(
            logits, bound.get("attn_mask"), bound.get("key_padding_mask"), bool(bound.get("is_causal", False))
        )
        return logits, allowed

    def _add(self, name: str, logits: Tensor, allowed: Tensor) -> None:
        maximum, entropy, rows, non_finite = attention_sums(logits, allowed, self.entropy_samples)
        summary = self.sums.get(name)
        if summary is None:
            zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
            summary = self.sums[name] = AttentionSums(zero - math.inf, zero, zero, zero)
        summary.add(maximum, entropy, rows, non_finite)


@contextmanager
def capture_attention(
    model: nn.Module, include: Callable[[str], bool] | None = None, entropy_samples: int | None = None
) -> Iterator[AttentionCapture]:
    """``with capture_attention(model) as capture: model(x)``: :class:`AttentionCapture` over ``model``'s modules,
    left (mode and hooks) on exit, even after an error."""
    capture = AttentionCapture({m: n for n, m in model.named_modules()}, include, entropy_samples)
    capture.start()
    try:
        yield capture
    finally:
        capture.stop()


def looks_like_attention(model: nn.Module) -> list[str]:
    """Names of modules that look like attention (``nn.MultiheadAttention``, or a class name containing
    "Attention"/"Attn"/"SelfAttn"): used to warn when such a model had no attention call captured."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if isinstance(module, nn.MultiheadAttention) or "attention" in cls or "attn" in cls:
            found.append(name or ROOT)
    return found


__all__ = [
    "ROOT",
    "AttentionCapture",
    "AttentionSums",
    "attention_sums",
    "capture_attention",
    "looks_like_attention",
    "mha_allowed",
    "mha_logits",
    "sdpa_logits",
    "softmax_logits",
]
