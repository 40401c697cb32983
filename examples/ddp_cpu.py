"""LandscapeMonitor under DDP: two CPU processes over gloo, on scikit-learn's digits.

Every rank keeps its own slice of the probe set; Hessian-vector products, feature moments and interpolation losses
are summed across ranks, so both ranks compute the same numbers (those of the union of the data) and only rank 0
writes logs. The script checks both: each rank dumps its last values, rank 0 compares them and counts the event
files.

    python examples/ddp_cpu.py          # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from _data import FAST, digits_tensors, loader
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_landscape import LandscapeMonitor


class DigitsClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
        self.x, self.y, _, _ = digits_tensors()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return loader(self.x, self.y, batch_size=32, shuffle=True)


class DumpPerRank(pl.Callback):
    """Each rank writes what it computed; a barrier makes sure rank 0 can read both files."""

    def __init__(self, monitor: LandscapeMonitor, folder: Path) -> None:
        self.monitor, self.folder = monitor, folder

    def on_train_end(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.monitor.last_metrics, sort_keys=True))
        trainer.strategy.barrier("landscape-dump")


def main(root: str, steps: int) -> None:
    pl.seed_everything(0)
    every = 20
    monitor = LandscapeMonitor(
        hessian={"top_k": 2, "every_n_steps": every},
        rank={"every_n_steps": every},
        connectivity={"every_n_steps": every},
        num_probe_batches=2,
        max_overhead=None,  # exact cadences: a 5% budget would postpone the Hessian past this short run
    )
    logger = TensorBoardLogger(root, name="ddp_cpu")
    dump = DumpPerRank(monitor, Path(root) / "ddp_cpu" / "per_rank")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        logger=logger,
        callbacks=[monitor, dump],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier())
    try:
        check_ranks_agree(trainer, dump, logger)
    finally:
        # Lightning destroys only NCCL groups at exit; a gloo group left alive can abort the process at exit
        torch.distributed.destroy_process_group()


def check_ranks_agree(trainer: pl.Trainer, dump: DumpPerRank, logger: TensorBoardLogger) -> None:
    if trainer.is_global_zero:
        # wall-clock keys (`*/seconds`, `*/budget/overhead`) are each rank's own time; every other value must agree
        dumps = [json.loads((dump.folder / f"rank{r}.json").read_text()) for r in (0, 1)]
        ranks = [{k: v for k, v in d.items() if not (k.endswith("/seconds") or "/budget/" in k)} for d in dumps]
        assert ranks[0], "nothing was measured"
        assert ranks[0] == ranks[1], "both ranks must compute the same numbers"
        events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
        assert len(events) == 1, f"only rank 0 writes logs, found {len(events)} event files"
        print(
            f"both ranks agree on {len(ranks[0])} values, e.g. sharpness {ranks[0]['landscape/sharpness']:.4f}, "
            f"RankMe {ranks[0]['landscape/rank/net.3/rankme']:.2f}; one event file in {logger.log_dir}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs")
    parser.add_argument("--steps", type=int, default=41 if FAST else 200)
    args = parser.parse_args()
    main(args.root, args.steps)
