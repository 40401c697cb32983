import pytest
import torch

from lightning_landscape.core.hvp import operator_mode
from lightning_landscape.core.reference import dense_eigvalsh, dense_hessian
from tests.helpers.ddp import load_dumps, run_ddp_script
from tests.helpers.lightning import ClassifierModule, loss_of

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_two_process_ddp_equals_single_process_on_union(tmp_path, mode):
    run_ddp_script("ddp_hessian_script.py", tmp_path, mode)
    metrics, union, weights = load_dumps(tmp_path)
    assert len(union) == 4
    model = ClassifierModule(dropout=0.0).double()
    model.load_state_dict(weights)
    with operator_mode(model, mode):
        expected = dense_eigvalsh(dense_hessian(model, loss_of, union))
    for i in range(3):
        assert metrics[0][f"landscape/hessian/eig_{i + 1}"] == pytest.approx(float(expected[i]), rel=1e-6)


def test_two_process_auto_probe_fraction_is_rank_zeros_choice(tmp_path):
    run_ddp_script("ddp_hessian_script.py", tmp_path, "auto")
    metrics, union, weights = load_dumps(tmp_path)
    assert metrics[0]["landscape/hessian/probe_fraction"] == 1.0  # rank 0's clock chose the whole batch
    model = ClassifierModule(dropout=0.0).double()
    model.load_state_dict(weights)
    with operator_mode(model, "eval"):
        expected = dense_eigvalsh(dense_hessian(model, loss_of, union))
    for i in range(3):
        assert metrics[0][f"landscape/hessian/eig_{i + 1}"] == pytest.approx(float(expected[i]), rel=1e-6)
