"""Rollback under 2-process DDP (gloo, CPU): an alert seen on one rank only is agreed at the decision point, and
every rank restores the same snapshot at the same step, bitwise."""

import json

import pytest
import torch

from tests.callbacks.rollback_helpers import assert_tensors_equal
from tests.helpers.ddp import run_ddp_script

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,  # ~90 s on two shared cores
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_every_rank_restores_the_same_snapshot_at_the_same_step(tmp_path):
    run_ddp_script("ddp_rollback_script.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"] == 1
    assert ranks[0]["snapshot_step"] == ranks[1]["snapshot_step"] == 18  # the next snapshot after the rollback
    assert [a["step"] for a in ranks[1]["alerts"]] == [12] and ranks[0]["alerts"] == []  # only rank 1 saw it
    states = [torch.load(tmp_path / f"states_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for state in states:
        # bitwise the state each rank had when the snapshot was taken (step 11): weights, buffers, momentum
        assert_tensors_equal(state["restored"]["model"], state["snapshot_time"]["model"])
        assert_tensors_equal(state["restored"]["optimizer"]["state"], state["snapshot_time"]["optimizer"]["state"])
        assert state["restored"]["lr"] == state["snapshot_time"]["lr"] * 0.5
    # the same parameters on both ranks after the rollback and at the end (buffers are each rank's own)
    names = [k for k in states[0]["final"] if "running" not in k and "num_batches" not in k]
    for key in ("restored", "final"):
        model = [s[key]["model"] if key == "restored" else s[key] for s in states]
        for name in names:
            assert torch.equal(model[0][name], model[1][name]), (key, name)
