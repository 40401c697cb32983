"""The GPU check script (benchmarks/gpu.py) runs end to end on CPU with its smoke options (no GPU needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_script_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "benchmarks/gpu.py", "--tiny", "--device", "cpu", "--steps", "30", "--repeats", "1"]
    completed = subprocess.run(
        [*command, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=540, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [row["backend"] for row in results["hvp"]] == ["func", "double_backward", "graph"]
    assert all(row["ratio"] > 0 for row in results["hvp"])  # every backend ran on the toy model
    assert results["measurement"]["measurements"] >= 2 and results["measurement"]["warm_steps"] > 0
    assert results["hooks"]["counted"] is False  # no CUDA: synchronisations are not counted, and say so
    assert set(results["hooks"]["hook_ms_per_step"]) == {
        "on_train_batch_start",
        "on_before_optimizer_step",
        "on_train_batch_end",
    }
    assert "ledger" in results["bundle"] and set(results["bundle"]["logged"]) == {"hessian", "rank", "connectivity"}
    assert "## HVP / gradient" in completed.stdout
