"""Offline linear-mode-connectivity: the barrier matrix over a list of saved checkpoints (torch only).

Used by the ``lightning-landscape lmc`` command and usable directly:

>>> matrix = barrier_matrix(model, loss_fn, batches, ["a.ckpt", "b.ckpt", "c.ckpt"])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.core._validation import check_choice
from lightning_landscape.core.barrier import BarrierResult, interpolation_barrier
from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.interpolation import (
    batchnorm_buffer_keys,
    check_bn_policy,
    interpolate_state,
    loaded_state,
    probe_set_totals,
    recompute_batchnorm,
)

PAIRS = ("consecutive", "all")


@dataclass(frozen=True)
class BarrierMatrix:
    """Chord barriers between checkpoints.

    Attributes:
        names: checkpoint names, in order.
        chord: (n, n) chord barriers; symmetric; NaN where a pair was not evaluated; 0 on the diagonal.
        mean: (n, n) mean barriers (Frankle et al.), likewise.
        curves: the full result of each evaluated pair ``(i, j)``, ``i < j``.
    """

    names: list[str]
    chord: Tensor
    mean: Tensor
    curves: dict[tuple[int, int], BarrierResult]

    def to_csv(self, path: str | Path) -> None:
        """Write the chord matrix as CSV with a header row and a name column."""
        lines = ["checkpoint," + ",".join(self.names)]
        for name, row in zip(self.names, self.chord.tolist(), strict=True):
            lines.append(name + "," + ",".join("" if math.isnan(v) else f"{v:.6g}" for v in row))
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model state dict of a Lightning checkpoint (``"state_dict"``) or of a plain ``torch.save``-d state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (expected a Lightning checkpoint or a saved state_dict).")
    return state


def evaluation_loss(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    state: dict[str, Tensor],
    bn_policy: str,
    bn_source: dict[str, Tensor] | None = None,
    seed: int | None = 0,
) -> float:
    """Size-weighted mean loss of ``model`` at ``state`` in eval mode, BatchNorm statistics per ``bn_policy``
    (each batch under the RNG seeded ``seed + index``, as in the monitors: a stochastic loss is reproducible)."""
    if bn_policy == "keep" and bn_source is not None:
        state = {**state, **{k: bn_source[k] for k in batchnorm_buffer_keys(model) if k in bn_source}}
    with loaded_state(model, state):
        if bn_policy == "recompute":
            recompute_batchnorm(model, batches, loss_fn)
        with operator_mode(model, "eval"):
            totals = probe_set_totals(model, loss_fn, batches, seed=seed)
    return float(totals[0] / totals[2])


def barrier_matrix(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    checkpoints: Sequence[str | Path],
    *,
    pairs: str = "consecutive",
    num_alphas: int = 11,
    refine_steps: int = 3,
    bn_policy: str = "recompute",
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> BarrierMatrix:
    """Chord barriers between consecutive (or all) pairs of ``checkpoints`` on ``batches``.

    The model is left as it was (its own state is restored bitwise). Cost: pairs x (num_alphas + refine_steps)
    evaluations of the batches (twice with ``"recompute"``). ``progress`` wraps the pair iterator (e.g. tqdm).

    Raises:
        ValueError: fewer than two checkpoints, or a bad ``pairs``/``bn_policy``.
    """
    check_choice("pairs", pairs, PAIRS)
    check_bn_policy(bn_policy)
    if len(checkpoints) < 2:
        raise ValueError(f"`checkpoints` must list at least two checkpoints, got {len(checkpoints)}.")
    device = next(model.parameters()).device
    states = [{k: v.to(device) for k, v in load_state_dict(path).items()} for path in checkpoints]
    n = len(states)
    todo = (
        [(i, i + 1) for i in range(n - 1)]
        if pairs == "consecutive"
        else [(i, j) for i in range(n) for j in range(i + 1, n)]
    )
    chord = torch.full((n, n), math.nan, dtype=torch.float64)
    mean = chord.clone()
    chord.fill_diagonal_(0.0)
    mean.fill_diagonal_(0.0)
    curves: dict[tuple[int, int], BarrierResult] = {}
    for i, j in progress(todo) if progress is not None else todo:
        a, b = states[i], states[j]

        def loss_at(alpha: float, a: dict = a, b: dict = b) -> float:
            return evaluation_loss(model, loss_fn, batches, interpolate_state(a, b, alpha), bn_policy, bn_source=a)

        result = interpolation_barrier(loss_at, num_alphas, refine_steps)
        curves[(i, j)] = result
        chord[i, j] = chord[j, i] = result.chord
        mean[i, j] = mean[j, i] = result.mean
    return BarrierMatrix([Path(p).name for p in checkpoints], chord, mean, curves)
