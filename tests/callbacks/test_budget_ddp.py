"""Budget mode under 2-process DDP: rank 0's clock decides and every rank measures at the same steps."""

import json

import pytest

from tests.callbacks.test_budget import MEASUREMENT_SECONDS, STEP_SECONDS
from tests.helpers.ddp import run_ddp_script

pytestmark = pytest.mark.timeout(300)


def test_ranks_with_different_clocks_measure_at_rank_zeros_steps(tmp_path):
    run_ddp_script("ddp_budget_script.py", tmp_path)
    steps = [json.loads((tmp_path / f"steps_rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0], "no measurement ran"
    assert steps[0] == steps[1]
    # rank 0's clock: 10 ms steps, so the first 100 ms measurement fits 5% after 200 steps (rank 1's alone: ~67)
    assert abs(steps[0][0] - MEASUREMENT_SECONDS / 0.05 / STEP_SECONDS) <= 1
    # over 600 of rank 0's 10 ms steps, 5% buys about three 100 ms measurements
    assert 2 <= len(steps[0]) <= 4
