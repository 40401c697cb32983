import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_stop_stops_both_ranks_together_without_hanging(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "callbacks" / "ddp_spikes_script.py"), str(tmp_path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process DDP run hung (killed after 240 s): {err}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "both ranks must see the same alerts and stop at the same step"
    assert ranks[0]["global_step"] == 101  # the spike at step 100 stopped the run right after that step
    assert {(a["step"], a["kind"]) for a in ranks[0]["alerts"]} == {(100, "grad_spike"), (100, "loss_spike")}
