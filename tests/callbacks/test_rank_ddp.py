import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.rank import alpha_req, eigenvalues_psd, rankme, singular_values
from tests.helpers.lightning import ClassifierModule

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_two_process_ranks_equal_single_process_on_the_union(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "callbacks" / "ddp_rank_script.py"), str(tmp_path)],
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
    assert metrics[0] == metrics[1]
    union = [b for r in (0, 1) for b in torch.load(tmp_path / f"probe_rank{r}.pt")]
    model = ClassifierModule(dropout=0.0).double()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    with operator_mode(model, "eval"), torch.no_grad():
        z = torch.cat([model.net[:-1](x) for x, _ in union])
    assert metrics[0]["landscape/rank/net.4/rankme"] == pytest.approx(rankme(singular_values(z)), rel=1e-9)
    centred = z - z.mean(0)
    expected = alpha_req(eigenvalues_psd(centred.T @ centred / len(z)))
    assert metrics[0]["landscape/rank/net.4/alpha_req"] == pytest.approx(expected, rel=1e-6)
