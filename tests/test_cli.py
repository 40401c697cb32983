import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_landscape.cli import import_object
from lightning_landscape.offline import barrier_matrix, load_state_dict
from tests.helpers.digits import DigitsModule
from tests.helpers.lightning import make_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    """Checkpoints written by a real short Trainer run on digits."""
    folder = tmp_path_factory.mktemp("ckpts")
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=20, save_top_k=-1, filename="{step}")
    trainer = make_trainer(folder, [saver], max_steps=60, enable_checkpointing=True, deterministic=False)
    trainer.fit(DigitsModule())
    return folder


def test_lmc_command_on_real_checkpoints(checkpoint_folder, tmp_path):
    out = tmp_path / "lmc"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_landscape.cli",
            "lmc",
            str(checkpoint_folder),
            "--module",
            "tests.helpers.digits:DigitsModule",
            "--datamodule",
            "tests.helpers.digits:DigitsDataModule",
            "--pairs",
            "all",
            "--num-alphas",
            "5",
            "--refine-steps",
            "1",
            "--num-batches",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "barriers" in proc.stderr  # the progress bar
    rows = list(csv.reader((out / "barriers.csv").open()))
    names = rows[0][1:]
    assert names == ["step=20.ckpt", "step=40.ckpt", "step=60.ckpt"]
    values = [[float(v) for v in row[1:]] for row in rows[1:]]
    assert all(values[i][i] == 0.0 for i in range(3))
    assert all(values[i][j] == values[j][i] >= 0.0 and math.isfinite(values[i][j]) for i in range(3) for j in range(3))
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert "landscape/lmc/barrier_matrix" in events.Tags()["images"]


def test_barrier_matrix_function_consecutive(checkpoint_folder):
    paths = sorted(checkpoint_folder.glob("*.ckpt"))
    model = DigitsModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = model.x[:128], model.y[:128]

    def loss(module, batch):
        return torch.nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    result = barrier_matrix(model, loss, [(x, y)], paths, num_alphas=5, refine_steps=0)
    assert math.isnan(float(result.chord[0, 2]))  # consecutive pairs only
    assert float(result.chord[0, 1]) >= 0.0
    curve = result.curves[(0, 1)]
    model.load_state_dict(load_state_dict(paths[0]))
    assert curve.losses[0] == pytest.approx(float(loss(model, (x, y))), rel=1e-6)  # endpoint reproduction
    model.load_state_dict(before)
    with pytest.raises(ValueError, match="`checkpoints` must list at least two"):
        barrier_matrix(model, loss, [(x, y)], paths[:1])
    with pytest.raises(ValueError, match="`pairs` must be one of"):
        barrier_matrix(model, loss, [(x, y)], paths, pairs="some")


def test_import_object_errors():
    assert import_object("tests.helpers.digits:DigitsModule") is DigitsModule
    assert import_object("tests.helpers.digits.DigitsModule") is DigitsModule
    with pytest.raises(ValueError, match="must look like 'package.module:ClassName'"):
        import_object("nothing")
    with pytest.raises(ValueError, match="Cannot import 'Nope'"):
        import_object("tests.helpers.digits:Nope")


def test_heatmap_leaves_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from lightning_landscape.cli import _heatmap

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend the user chose: drawing the heatmap must not switch it
    try:
        assert _heatmap(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ["a", "b"], tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert "landscape/lmc/barrier_matrix" in events.Tags()["images"]
