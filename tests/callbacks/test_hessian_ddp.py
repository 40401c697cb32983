import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian
from tests.helpers.lightning import ClassifierModule, loss_of

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_two_process_ddp_equals_single_process_on_union(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "callbacks" / "ddp_hessian_script.py"
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), mode],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process DDP run hung (killed after 240 s): {err}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    assert metrics[0], "rank 0 logged nothing"
    assert metrics[0] == metrics[1], "every rank must run the same Lanczos and get the same numbers"

    probes = [torch.load(tmp_path / f"probe_rank{r}.pt") for r in (0, 1)]
    union = [batch for probe in probes for batch in probe]
    assert len(union) == 4
    model = ClassifierModule(dropout=0.0).double()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    with operator_mode(model, mode):
        expected = dense_eigvalsh(dense_hessian(model, loss_of, union))
    for i in range(3):
        assert metrics[0][f"landscape/hessian/eig_{i + 1}"] == pytest.approx(float(expected[i]), rel=1e-6)
