"""Where LandscapeMonitor()'s ledger goes on one workload: the per-step work no part owns against the parts' own
measurements, and each part's first and typical costs in training steps.

    PYTHONPATH=$PWD taskset -c 1 python benchmarks/ledger_floor.py --steps 3000 --workload mlp

The *unowned* ledger is every hook's time that no part's own tally holds: the gradient monitor's per-step work
(sample count, loss capture, reads every ``stride`` steps, the logged steps' flush and logging) and the bundle's
bookkeeping (dispatch, sections, probe capture). It cannot be postponed, so on a millisecond step it is what decides
how much of the budget is left for the periodic measurements. To compare two commits, run this from each checkout
in turn (interleaved, several repeats), e.g. with a ``git worktree`` of the older one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grad_spikes import Workload
from overhead import WORKLOADS, quiet_trainer

from lightning_landscape import LandscapeMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workload", choices=WORKLOADS, default="mlp")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    monitor = LandscapeMonitor(on_alert="ignore")
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tempfile.mkdtemp(), name="floor")
    trainer = quiet_trainer(args.steps, [monitor], logger=logger, log_every_n_steps=50)
    trainer.fit(Workload(args.workload))
    ledger, steps = monitor.budget, trainer.global_step
    training = ledger.training_time()
    per_step = training / steps
    owned = sum(ledger.cost_by_owner.values()) + sum(ledger.first_cost_by_owner.values())
    print("| part | share | own ledger | first points (steps) | typical point (steps) x count |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, part in monitor.parts.items():
        key, schedule = id(part), part.schedule
        total, count = schedule.typical_costs
        typical = f"{total / count / per_step:.1f} x{count}" if count else "-"
        print(
            f"| {name} | {schedule.share:.3f} | {ledger.cost_by_owner.get(key, 0.0) / training:.2%} "
            f"| {ledger.first_cost_by_owner.get(key, 0.0) / per_step:.1f} | {typical} |"
        )
    unowned = ledger.cost - owned
    print(
        f"\n{args.workload}, {steps} steps of {1e3 * per_step:.2f} ms: ledger {ledger.overhead():.2%}, "
        f"unowned {unowned / training:.2%} ({1e6 * unowned / steps:.1f} us a step), owned {owned / training:.2%}"
    )


if __name__ == "__main__":
    main()
