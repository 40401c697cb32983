"""Smoke test of the early-warning scenario suite (benchmarks/early_warning.py): the plumbing of one scenario in
``--fast`` mode, and the rules the report is built from, by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "early_warning.py"


@pytest.fixture(scope="module")
def early_warning():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("early_warning", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["early_warning"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("early_warning", None)


@pytest.mark.slow  # ~10 s of CPU, 25-60 s on a loaded 2-core machine
def test_fast_run_of_one_scenario(early_warning, tmp_path, capsys):
    dump = tmp_path / "ew.json"
    early_warning.main(["--fast", "--only", "gpt-sdpa-high-lr", "--dump", str(dump)])
    report = json.loads(dump.read_text())
    (result,) = report["results"]
    assert result["scenario"] == "gpt-sdpa-high-lr" and result["paired"]
    for variant in ("unstable", "control"):
        assert len(result[variant]["dense"]["losses"]) == early_warning.FAST_STEPS
        assert len(result[variant]["bundle"]["losses"]) == early_warning.FAST_STEPS
        # same seed, monitors that never change training: the dense and the bundle run see the same losses
        assert result[variant]["dense"]["losses"] == result[variant]["bundle"]["losses"]
    assert result["unstable"]["dense"]["losses"][0] == result["control"]["dense"]["losses"][0]
    (row,) = report["summary"]
    supported, _ = early_warning.rollback_support()
    if supported:
        assert len(result["rollback"]["losses"]) == early_warning.FAST_STEPS
        assert row["rollback"].startswith(("healthy", "not healthy"))
    else:
        assert result["rollback"] is None and row["rollback"] == "n/a (not implemented)"
    out = capsys.readouterr().out
    assert "### gpt-sdpa-high-lr" in out and "**LandscapeMonitor()**" in out and "### Summary" in out


def test_healthy_rule(early_warning):
    ratio = early_warning.HEALTHY_RATIO
    assert early_warning._healthy(2.0 * ratio, 2.0) is True
    assert early_warning._healthy(2.0 * ratio + 1e-9, 2.0) is False
    assert early_warning._healthy(math.inf, 2.0) is False
    assert early_warning._healthy(1.0, None) is None
    assert early_warning._tail_mean([9.0] * 5 + [1.0] * 10 + [3.0] * 10) == 2.0  # the last 20 only
    assert early_warning._tail_mean([1.0] * 19 + [math.nan]) == math.inf


def test_kill_loss_spike_rule(early_warning):
    losses = [1.0] * 100 + [1.9] + [2.0] * 5
    # 1.9 is no outlier (< 2 x 1.0) but enters the window: the mean becomes 1.009 and 2.0 is none either
    assert early_warning.kill_loss_spike_first_alert(losses) is None
    losses = [1.0] * 100 + [2.5] * 5
    assert early_warning.kill_loss_spike_first_alert(losses) == 104
    assert early_warning.kill_loss_spike_first_alert([1.0] * 100 + [math.nan] * 5) == 104
    # exactly 2x the window mean is an outlier (llm-foundry compares with >=)
    assert early_warning.kill_loss_spike_first_alert([1.0, 2.0], window=1, patience=0) == 1
    assert early_warning.kill_loss_spike_first_alert([1.0, 1.999], window=1, patience=0) is None


@pytest.mark.slow  # four 12-step runs with every monitor: ~25 s on the loaded 2-core machine
def test_grokking_scenario_passes_its_logit_arguments_and_runs_fast(early_warning, tmp_path):
    (scenario,) = [s for s in early_warning.SCENARIOS if s.name == "grokking-softmax-collapse"]
    assert scenario.unstable().weight_decay == 0.0 and scenario.control().weight_decay == 1.0
    # the opt-in alert reaches the dense LogitMonitor (other scenarios keep its defaults)
    (logits,) = [
        m for m in early_warning.dense_monitors(4, print, scenario.logits) if type(m).__name__ == "LogitMonitor"
    ]
    assert logits.softmax_collapse_fraction == 0.1
    (default,) = [m for m in early_warning.dense_monitors(4, print) if type(m).__name__ == "LogitMonitor"]
    assert default.softmax_collapse_fraction is None
    result = early_warning.run_scenario(scenario, str(tmp_path), fast=True, rollback=False)
    assert result["paired"] and result["rollback"] is None
    for variant in ("unstable", "control"):
        dense, bundle = result[variant]["dense"], result[variant]["bundle"]
        assert len(dense["losses"]) == early_warning.FAST_STEPS
        assert dense["losses"] == bundle["losses"]  # monitors never change training
    assert "| signal |" in early_warning.scenario_table(result)


def test_a_scenario_not_judged_by_the_loss_gets_no_healthy_verdict(early_warning):
    def result(name, loss_judges=None):
        out = {
            "scenario": name,
            "paired": True,
            "control": {"dense": {"divergence": None, "first": {}, "tail_mean": 1.0}, "bundle": {"first": None}},
            "unstable": {
                "dense": {"divergence": None, "first": {}},
                "bundle": {"first": 5, "first_kind": "softmax_collapse", "tail_mean": 1.0},
            },
            "rollback": {"tail_mean": 1.0, "rollbacks": 1},
        }
        if loss_judges is not None:
            out["loss_judges"] = loss_judges
        return out

    judged, unjudged, by_name = early_warning.summary_rows(
        [result("x", True), result("x", False), result("grokking-softmax-collapse")], "n/a"
    )
    assert judged["plain_healthy"] is True and judged["rollback"].startswith("healthy")
    for row in (unjudged, by_name):  # the flag, or for older dumps the scenario's own by name
        assert row["plain_healthy"] is None and row["rollback"].startswith("not judged by the loss")
