import json

import pytest
import torch

from tests.helpers.ddp import run_ddp_script

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_stop_stops_both_ranks_together_without_hanging(tmp_path):
    run_ddp_script("ddp_spikes_script.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "both ranks must see the same alerts and stop at the same step"
    assert ranks[0]["global_step"] == 101  # the spike at step 100 stopped the run right after that step
    assert {(a["step"], a["kind"]) for a in ranks[0]["alerts"]} == {(100, "grad_spike"), (100, "loss_spike")}
