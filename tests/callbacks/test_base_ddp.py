"""A measurement that fails on one rank under 2-process DDP: no hang, every rank skips it and training goes on."""

import json

import pytest
import torch

from tests.helpers.ddp import run_ddp_script

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
]


def test_failure_on_one_rank_is_agreed_and_nobody_waits(tmp_path):
    run_ddp_script("ddp_failure_script.py", tmp_path)  # fails on a hang (timeout) or a crash
    status = [json.loads((tmp_path / f"status_rank{r}.json").read_text()) for r in (0, 1)]
    assert status[0] == status[1], "the ranks must agree on every measurement's status"
    assert status[0]["steps"] == 6
    for group in ("hessian", "rank"):
        assert status[0][group] == {"0": 1.0, "2": 0.0, "4": 1.0}, group
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    parameters = [k for k in weights[0] if "running_" not in k and "num_batches" not in k]  # BN stats are per rank
    assert parameters and all(torch.equal(weights[0][k], weights[1][k]) for k in parameters)
