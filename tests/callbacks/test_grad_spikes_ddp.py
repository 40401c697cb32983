import json

import pytest
import torch

from tests.helpers.ddp import run_ddp_script

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process run of ddp_spikes_script.py shared by the tests below (each run takes ~45 s on CPU)."""
    out = tmp_path_factory.mktemp("ddp_spikes")
    run_ddp_script("ddp_spikes_script.py", out)
    return out


def test_stop_stops_both_ranks_together_without_hanging(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "both ranks must see the same alerts and stop at the same step"
    assert ranks[0]["global_step"] == 101  # the spike at step 100 stopped the run right after that step
    assert {(a["step"], a["kind"]) for a in ranks[0]["alerts"]} == {(100, "grad_spike"), (100, "loss_spike")}


def test_nlm_alignment_is_the_reduced_gradients_cosine_on_both_ranks(ddp_run):
    ranks = [json.loads((ddp_run / f"nlm_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["logged"] == ranks[1]["logged"]  # the same number on both ranks, bitwise
    logged, twin = ranks[0]["logged"], ranks[0]["twin"]
    assert len(logged) == 101 and all(v is not None for v in logged.values())
    for step, value in logged.items():
        assert value == pytest.approx(twin[step], rel=1e-5, abs=1e-7), step
