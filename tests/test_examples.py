"""Every example runs in fast mode (LANDSCAPE_FAST=1) and passes its own checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_and_checks_itself(tmp_path, script):
    env = {**os.environ, "LANDSCAPE_FAST": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / script), "--root", str(tmp_path / "runs")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} took more than 280 s in fast mode")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file written"
