"""Cost of LogitMonitor's in-forward capture against a plain training step, and against the probe forward it replaced.

On the nanoGPT-style model of ``tests/helpers/real_models.py`` (``F.scaled_dot_product_attention``), one training
step (forward, backward, AdamW step) is timed three ways, interleaved (A, B, C, A, B, C, ...), median of ``--repeats``:

- plain: the step alone;
- capture: the step with LogitMonitor's capture armed (attention capture mode, output-logit hook), then the one
  read-back of the statistics, exactly what a due step costs now;
- probe: the step plus one extra forward of the batch through the loss (what a due step cost before: the probe
  forward, with its own attention recomputation left out, so this is a lower bound of the old cost).

Usage: ``PYTHONPATH=$PWD python benchmarks/logit_capture.py [--repeats 30] [--layers 4] [--width 128]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_landscape.callbacks.logits import LogitMonitor, _Armed
from tests.helpers.real_models import NanoGPT, lm_windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = NanoGPT(n_layer=args.layers, n_embd=args.width, n_head=4, block_size=args.block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = lm_windows(args.block, args.batch)
    batch = (inputs[: args.batch], targets[: args.batch])
    monitor = LogitMonitor()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.lm_loss(batch).backward()
        optimizer.step()

    def plain() -> None:
        step()

    def capture() -> None:
        attention, output, layers = monitor.watched_modules(model)
        armed = _Armed(0, time.perf_counter())
        monitor._install(armed, model, attention, output, layers)
        try:
            optimizer.zero_grad(set_to_none=True)
            model.lm_loss(batch).backward()
        finally:
            armed.disarm()
        optimizer.step()
        values = monitor._declared(armed)
        torch.stack([t.reshape(()).double() for t, _ in values.values()]).tolist()

    def probe() -> None:
        step()
        model.lm_loss(batch)  # the extra forward (graph built and dropped, as the old probe did)

    ways = {"plain": plain, "capture": capture, "probe": probe}
    for way in ways.values():  # warm-up
        way()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["plain"])
    print(
        f"nanoGPT layers={args.layers} width={args.width} batch={args.batch} block={args.block}, "
        f"median of {args.repeats} interleaved"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:8s} {median * 1e3:8.2f} ms   {median / base - 1:+.3f} of a plain step")


if __name__ == "__main__":
    main()
