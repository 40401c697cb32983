"""The probe set: the first training batches seen, copied once to the host, used by every measurement.

One :class:`ProbeSet` serves every part of a ``LandscapeMonitor`` (a part that wants ``k`` batches reads the first
``k``); a standalone monitor keeps its own. Memory: one copy of the batches in host memory (under DDP each process
also keeps every other rank's slice, gathered once, so that rank 0's checkpoint restores all of them); on the
accelerator only during a measurement (:meth:`ProbeSet.on_device`), freed when it ends. Checkpoint: one entry,
``probe_by_rank`` (per rank, a list of batches on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_landscape.core import distributed

_CPU = torch.device("cpu")


def host_copy(batch: Any) -> Any:
    """A copy on the host sharing no storage with ``batch`` (containers rebuilt, tensors copied): the dataloader may
    reuse its buffers, and a probe set or a snapshot must never change."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().to(_CPU, copy=True))


def to_device(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))


class ProbeSet:
    """The first ``size`` training batches of this process, in host memory.

    Args:
        size: batches to keep (the largest ``num_probe_batches`` of the monitors reading it).

    Attributes:
        batches: this rank's batches (CPU), in the order seen.
        by_rank: every rank's batches once the set is complete (``None`` before); ``by_rank[rank] is batches``.
        loaded: the ``probe_by_rank`` of a checkpoint, applied at the first batch (the rank is known then).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: list[Any] = []
        self.by_rank: list[list[Any]] | None = None
        self.loaded: list[list[Any]] | None = None

    @property
    def complete(self) -> bool:
        return self.by_rank is not None

    def has(self, count: int) -> bool:
        """Whether the first ``count`` batches are here (the same answer on every rank: all see the same steps)."""
        return self.complete or len(self.batches) >= count

    def capture(self, world_size: int, batch: Any) -> None:
        """Keep a host copy of ``batch`` until the set is complete; then gather every rank's slice (a collective,
        reached by every rank at the same batch, since every rank completes its set at the same one)."""
        if self.by_rank is not None:
            return
        self.batches.append(host_copy(batch))
        if len(self.batches) == self.size:
            gathered = distributed.all_gather_object(self.batches) if world_size > 1 else [self.batches]
            gathered[distributed.rank() if world_size > 1 else 0] = self.batches  # this rank's: one copy, not two
            self.by_rank = gathered

    def first(self, count: int) -> list[Any]:
        """This rank's first ``count`` batches, on the host."""
        return self.batches[:count]

    def on_device(self, count: int, device: torch.device) -> list[Any]:
        """This rank's first ``count`` batches on ``device`` (the caller drops them after the measurement)."""
        return [to_device(b, device) for b in self.batches[:count]]

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        probe = self.by_rank if self.by_rank is not None else [self.batches]
        return {"probe_by_rank": [[to_device(b, _CPU) for b in rank_probe] for rank_probe in probe]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state.get("probe_by_rank")

    def restore_loaded(self, world_size: int, rank: int, owner: str, warn: Callable[[str, str], None]) -> None:
        """Apply a checkpoint's probe set if it fits this run (same world size, complete), else warn (``owner``
        names the monitor) and capture a new one."""
        loaded, self.loaded = self.loaded, None
        if not loaded:
            return
        if len(loaded) == world_size and all(len(p) == self.size for p in loaded):
            self.by_rank = list(loaded)
            self.batches = loaded[rank]
            return
        if len(loaded) != world_size:
            cause = f"was captured with {len(loaded)} process(es) and the world size is now {world_size}"
        else:
            sizes = sorted({len(p) for p in loaded})
            cause = (
                f"holds {'/'.join(map(str, sizes))} batch(es) per process and `num_probe_batches` is "
                f"{self.size} (the checkpoint was saved before its probe set was complete, or "
                "`num_probe_batches` changed)"
            )
        warn(
            "probe-resume",
            f"{owner}: the checkpoint's probe set {cause}; capturing a new probe set, so values "
            "before and after the resume are not directly comparable.",
        )


def migrate_part_probes(part_states: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An old ``LandscapeMonitor`` checkpoint (before the shared probe set) kept one probe set per part, each the
    first ``num_probe_batches`` batches of the same run: the longest holds every other's. Returns it as the shared
    set's state (``None`` when no part has one)."""
    found = [s["probe_by_rank"] for s in part_states if s.get("probe_by_rank")]
    if not found:
        return None
    return {"probe_by_rank": max(found, key=lambda by_rank: min(len(p) for p in by_rank))}


__all__ = ["ProbeSet", "host_copy", "migrate_part_probes", "to_device"]
