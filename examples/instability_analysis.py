"""Frankle et al.'s instability analysis in miniature, on real text.

Frankle, Dziugaite, Roy & Carbin (ICML 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"): train
two copies of a network from the same starting point with different data orders, then look at the loss on the
straight line between the two results. Spawned from initialisation, the copies end in different basins (a loss
barrier between them: the run is *unstable* to SGD noise); spawned from a checkpoint a little way into training,
they end linearly connected (no barrier).

Here: a small character-level transformer on the Python standard library's own source files, AdamW, two copies per
spawn point with different data orders, the chord barrier of the held-out loss computed by
``lightning_landscape.offline.barrier_matrix`` from the saved weights. The script checks that the copies spawned at
initialisation have a clear barrier and the copies spawned later have (almost) none.

    python examples/instability_analysis.py     # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _data import FAST
from torch import nn
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from grad_spikes import CharTransformer, stdlib_text

from lightning_landscape.offline import barrier_matrix

CONTEXT = 32


def main(root: str, total_steps: int, spawn_step: int, lr: float) -> dict[int, float]:
    torch.manual_seed(0)
    text = stdlib_text(300_000)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    train_ids, held_out = ids[:250_000], ids[250_000:]
    windows = held_out[: (len(held_out) // (CONTEXT + 1)) * (CONTEXT + 1)].view(-1, CONTEXT + 1)[:256]
    evaluation = [(windows[:, :-1], windows[:, 1:])]

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))

    def train(model: nn.Module, steps: int, data_seed: int) -> nn.Module:
        generator = torch.Generator().manual_seed(data_seed)  # the data order: the only difference between copies
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (32,), generator=generator)
            window = torch.stack([train_ids[s : s + CONTEXT + 1] for s in starts])
            optimizer.zero_grad()
            loss_fn(model, (window[:, :-1], window[:, 1:])).backward()
            optimizer.step()
        return model

    torch.manual_seed(0)
    initial = CharTransformer(len(chars), width=64, layers=2, context=CONTEXT)
    barriers: dict[int, float] = {}
    folder = Path(root) / "instability_analysis"
    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(folder))
    for spawn in (0, spawn_step):
        parent = train(copy.deepcopy(initial), spawn, data_seed=123) if spawn else copy.deepcopy(initial)
        paths = []
        for copy_index, data_seed in enumerate((1, 2)):
            child = train(copy.deepcopy(parent), total_steps - spawn, data_seed)
            path = folder / f"spawn{spawn}_copy{copy_index}.pt"
            torch.save(child.state_dict(), path)
            paths.append(path)
        result = barrier_matrix(copy.deepcopy(initial), loss_fn, evaluation, paths, num_alphas=11, refine_steps=2)
        curve = result.curves[(0, 1)]
        barriers[spawn] = float(result.chord[0, 1])
        writer.add_scalar("landscape/lmc/barrier_between_copies", barriers[spawn], global_step=spawn)
        for alpha, value in zip(curve.alphas, curve.losses, strict=True):
            writer.add_scalar(f"landscape/lmc/curve_spawn_{spawn}", value, global_step=round(alpha * 100))
        print(
            f"spawned at step {spawn:4d}: held-out loss of the copies {curve.losses[0]:.3f} / {curve.losses[-1]:.3f}, "
            f"chord barrier {barriers[spawn]:.3f} (peak at alpha {curve.chord_alpha:.2f})"
        )
    writer.close()
    assert barriers[0] > 0.03, "copies spawned at initialisation should not be linearly connected"
    assert barriers[spawn_step] < 0.25 * barriers[0], "copies spawned later should be (nearly) linearly connected"
    return barriers


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs", help="log root: runs/instability_analysis gets the weights and logs")
    parser.add_argument("--steps", type=int, default=400 if FAST else 600)
    parser.add_argument("--spawn", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    main(args.root, args.steps, args.spawn, args.lr)
