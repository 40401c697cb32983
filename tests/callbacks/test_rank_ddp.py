import pytest
import torch

from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.rank import alpha_req, eigenvalues_psd, rankme, singular_values
from tests.helpers.ddp import load_dumps, run_ddp_script
from tests.helpers.lightning import ClassifierModule

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_two_process_ranks_equal_single_process_on_the_union(tmp_path):
    run_ddp_script("ddp_rank_script.py", tmp_path)
    metrics, union, weights = load_dumps(tmp_path)
    model = ClassifierModule(dropout=0.0).double()
    model.load_state_dict(weights)
    with operator_mode(model, "eval"), torch.no_grad():
        z = torch.cat([model.net[:-1](x) for x, _ in union])
    assert metrics[0]["landscape/rank/net.4/rankme"] == pytest.approx(rankme(singular_values(z)), rel=1e-9)
    centred = z - z.mean(0)
    expected = alpha_req(eigenvalues_psd(centred.T @ centred / len(z)))
    assert metrics[0]["landscape/rank/net.4/alpha_req"] == pytest.approx(expected, rel=1e-6)


def test_ranks_that_recorded_different_modules_agree_by_name(tmp_path):
    # only rank 0 runs `branch`: its sums come from rank 0's two probe batches alone (the first two of the union),
    # the others' from both ranks, and no rank misaligns or waits (a hang fails the subprocess's timeout)
    from tests.callbacks.ddp_rank_modules_script import Branchy

    run_ddp_script("ddp_rank_modules_script.py", tmp_path)
    metrics, union, weights = load_dumps(tmp_path)
    model = Branchy().double()
    model.load_state_dict(weights)
    inputs = {"trunk": [], "branch": [], "head": []}
    with torch.no_grad():
        for index, (x, _) in enumerate(union):
            inputs["trunk"].append(x)
            h = torch.tanh(model.trunk(x))
            if index < 2:
                inputs["branch"].append(h)
                h = torch.tanh(model.branch(h))
            inputs["head"].append(h)
    assert len(inputs["branch"]) == 2 and len(inputs["head"]) == 4  # rank 0's two probe batches, of four
    for name, parts in inputs.items():
        z = torch.cat(parts)
        assert metrics[0][f"landscape/rank/{name}/rankme"] == pytest.approx(rankme(singular_values(z)), rel=1e-9)
        centred = z - z.mean(0)
        expected = alpha_req(eigenvalues_psd(centred.T @ centred / len(z)))
        assert metrics[0][f"landscape/rank/{name}/alpha_req"] == pytest.approx(expected, rel=1e-6)
