"""``lightning-landscape``: offline analysis of a folder of checkpoints.

    lightning-landscape lmc CHECKPOINT_DIR --module pkg.models:MyModule --datamodule pkg.data:MyData \\
        [--pairs consecutive|all] [--num-alphas 11] [--bn-policy recompute] [--num-batches 4] [--out runs/lmc]

Loads the LightningModule class from the first checkpoint (``load_from_checkpoint``, so its saved hyperparameters
are used), takes the first ``--num-batches`` batches of the DataModule's ``train_dataloader()`` (or
``val_dataloader()`` with ``--split val``) as the fixed evaluation set, and evaluates the loss given by the
module's ``training_step`` (logging suppressed) along the straight line between checkpoints. Writes the chord
barrier matrix as ``barriers.csv`` and as a TensorBoard heatmap image under ``--out``; shows a progress bar.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def import_object(path: str) -> Any:
    """``"package.module:Name"`` or ``"package.module.Name"`` -> the object.

    Raises:
        ValueError: the path names no importable object.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"`{path}` must look like 'package.module:ClassName'.")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot import {attribute!r} from {module_name!r}: {err}") from err


def _checkpoints(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
    if len(found) < 2:
        raise SystemExit(f"error: {folder} must hold at least two *.ckpt files, found {len(found)}.")
    return found


def _heatmap(matrix: Any, names: list[str], out: Path) -> bool:
    # A Figure drawn on its own Agg canvas: no pyplot, and no `matplotlib.use`, which would switch the backend of
    # the whole process (a notebook calling `main` would lose its inline figures).
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    figure = Figure(figsize=(1.0 + 0.5 * len(names), 0.8 + 0.5 * len(names)), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    image = axis.imshow(matrix.numpy(), cmap="viridis")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axis.set_yticks(range(len(names)), names, fontsize=6)
    figure.colorbar(image, ax=axis, label="chord barrier (loss)")
    figure.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3]
    with SummaryWriter(str(out)) as writer:
        writer.add_image("landscape/lmc/barrier_matrix", rgb, global_step=0, dataformats="HWC")
    return True


def lmc(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from lightning_landscape.callbacks._base import _logging_suppressed, _training_step_loss
    from lightning_landscape.offline import barrier_matrix

    module_cls = import_object(args.module)
    datamodule_cls = import_object(args.datamodule)
    checkpoints = _checkpoints(Path(args.folder))
    model = module_cls.load_from_checkpoint(str(checkpoints[0]), map_location="cpu")
    datamodule = datamodule_cls(**json.loads(args.datamodule_args))
    datamodule.setup("fit")
    loader = datamodule.val_dataloader() if args.split == "val" else datamodule.train_dataloader()
    batches = list(itertools.islice(iter(loader), args.num_batches))
    n = len(checkpoints)
    num_pairs = n - 1 if args.pairs == "consecutive" else n * (n - 1) // 2
    print(
        f"{n} checkpoints, pairs={args.pairs}, {len(batches)} batches, bn_policy={args.bn_policy}: "
        f"{num_pairs} pairs x {args.num_alphas + args.refine_steps} evaluations",
        file=sys.stderr,
    )
    with _logging_suppressed(model), torch.no_grad():
        result = barrier_matrix(
            model,
            _training_step_loss,
            batches,
            checkpoints,
            pairs=args.pairs,
            num_alphas=args.num_alphas,
            refine_steps=args.refine_steps,
            bn_policy=args.bn_policy,
            progress=lambda pairs: tqdm(pairs, desc="barriers", unit="pair"),
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "barriers.csv")
    drew = _heatmap(result.chord.nan_to_num(nan=0.0), result.names, out)
    print(f"wrote {out / 'barriers.csv'}" + ("" if drew else " (no heatmap: pip install matplotlib)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-landscape", description="Offline loss-landscape analysis.")
    commands = parser.add_subparsers(dest="command", required=True)
    lmc_parser = commands.add_parser("lmc", help="linear-mode-connectivity barriers between checkpoints")
    lmc_parser.add_argument("folder", help="folder holding the *.ckpt files (ordered by modification time)")
    lmc_parser.add_argument("--module", required=True, help="LightningModule class, 'package.module:Class'")
    lmc_parser.add_argument("--datamodule", required=True, help="LightningDataModule class, 'package.module:Class'")
    lmc_parser.add_argument("--datamodule-args", default="{}", help="JSON keyword arguments for the DataModule")
    lmc_parser.add_argument("--split", choices=["train", "val"], default="train")
    lmc_parser.add_argument("--pairs", choices=["consecutive", "all"], default="consecutive")
    lmc_parser.add_argument("--num-alphas", type=int, default=11)
    lmc_parser.add_argument("--refine-steps", type=int, default=3)
    lmc_parser.add_argument("--bn-policy", choices=["recompute", "interpolate", "keep"], default="recompute")
    lmc_parser.add_argument("--num-batches", type=int, default=4)
    lmc_parser.add_argument("--out", default="runs/lmc", help="output folder (CSV + TensorBoard event file)")
    args = parser.parse_args(argv)
    try:
        return lmc(args)
    except ValueError as err:
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
