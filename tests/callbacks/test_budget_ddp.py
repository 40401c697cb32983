"""Budget mode under 2-process DDP: rank 0's clock decides and every rank measures at the same steps."""

import json

import pytest

from tests.callbacks.test_budget import MEASUREMENT_SECONDS, STEP_SECONDS
from tests.helpers.ddp import run_ddp_script

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget_ddp")
    run_ddp_script("ddp_budget_script.py", out)
    return out


def test_ranks_with_different_clocks_measure_at_rank_zeros_steps(ddp_run):
    tmp_path = ddp_run
    steps = [json.loads((tmp_path / f"steps_rank{r}.json").read_text()) for r in (0, 1)]
    assert steps[0], "no measurement ran"
    assert steps[0] == steps[1]
    # rank 0's clock: 10 ms steps, so the first 100 ms measurement fits 5% after 200 steps (rank 1's alone: ~67)
    assert abs(steps[0][0] - MEASUREMENT_SECONDS / 0.05 / STEP_SECONDS) <= 1
    # over 600 of rank 0's 10 ms steps, 5% buys about three 100 ms measurements
    assert 2 <= len(steps[0]) <= 4


def test_gradient_stride_is_rank_zeros_on_every_rank(ddp_run):
    # (the same run) reading the gradients is costly on rank 0's clock only: both ranks must read at the same steps,
    # or the deferred losses' all-reduce would pair different steps (or hang)
    logs = [json.loads((ddp_run / f"strides_rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0]["strides"] == logs[1]["strides"]
    assert max(logs[0]["strides"]) > 1  # rank 0's clock asked for a stride (rank 1's alone never would)
    assert logs[0]["alerts"] == logs[1]["alerts"]
