"""The grokking benchmark (benchmarks/grokking.py): the task by hand, the plumbing of one short arm, the report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "grokking.py"


@pytest.fixture(scope="module")
def grokking():
    spec = importlib.util.spec_from_file_location("grokking", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["grokking"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("grokking", None)


def test_the_task_is_modular_addition_on_a_disjoint_split(grokking):
    x, y, x_val, y_val = grokking.modular_addition(7, 0.4)
    assert x.shape == (int(0.4 * 49), 14) and x.dtype == torch.float32 and len(x_val) == 49 - len(x)
    for inputs, targets in ((x, y), (x_val, y_val)):
        a, b = inputs[:, :7].argmax(1), inputs[:, 7:].argmax(1)
        assert torch.equal(targets, (a + b) % 7) and torch.equal(inputs.sum(1), torch.full((len(inputs),), 2.0))
    assert len({tuple(r.nonzero().flatten().tolist()) for r in torch.cat([x, x_val])}) == 49  # every pair once


def test_one_short_arm_records_every_logging_step(grokking):
    arm = grokking.run_arm(0.0, 9, 4, 0.1, modulus=11, hidden=16)
    assert sorted(arm["rows"]) == [0, 4, 8]
    for row in arm["rows"].values():
        assert 0.0 <= row["collapse"] <= 1.0 and 0.0 <= row["val_acc"] <= 1.0 and row["loss"] > 0
    assert arm["rows"][0]["collapse"] == 0.0  # at initialisation no row is saturated
    report = grokking.summary(arm, {**arm, "weight_decay": 1.0})
    assert "| no weight decay |" in report and "| weight decay 1 |" in report


def _arm(weight_decay, collapse, nlm=None):
    rows = {
        s: {"loss": 1.0, "train_acc": 1.0, "val_acc": 0.5, "collapse": c, "nlm_alignment": nlm} for s, c in collapse
    }
    return {"weight_decay": weight_decay, "rows": rows, "first_alerts": {"softmax_collapse": 20}, "seconds": 1.0}


def test_report_tables(grokking):
    plain, control = _arm(0.0, [(0, 0.0), (10, 0.2), (20, 0.4), (25, 0.3)]), _arm(1.0, [(0, 0.0), (10, 0.0)])
    table = grokking.table(plain, control, 10).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| 0", "| 10", "| 20", "| 25"]  # stride + the last
    assert "nlm_alignment" not in table[0]
    assert "nlm_alignment" in grokking.table(_arm(0.0, [(0, 0.0)], 0.9), control, 10).splitlines()[0]
    summary = grokking.summary(plain, control).splitlines()
    assert summary[2].startswith("| no weight decay | 20 | 0.400 (20) |")


@pytest.mark.slow  # two 800-step arms: ~40 s of CPU
def test_fast_mode_collapses_without_weight_decay_and_not_with_it(grokking):
    result = grokking.main(["--fast"])
    plain, control = result["plain"], result["control"]
    assert "softmax_collapse" in plain["first_alerts"] and "softmax_collapse" not in control["first_alerts"]
    assert max(r["val_acc"] for r in plain["rows"].values()) < 0.05  # stuck at chance
    assert control["rows"][max(control["rows"])]["val_acc"] > 0.9  # the control groks
