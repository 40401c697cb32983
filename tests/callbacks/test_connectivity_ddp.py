import json

import pytest
import torch

from lightning_landscape.core.barrier import interpolation_barrier
from lightning_landscape.core.interpolation import interpolate_state, recompute_batchnorm
from tests.helpers.ddp import run_ddp_script, without_timings
from tests.helpers.lightning import ClassifierModule, loss_of

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def test_two_process_barrier_equals_single_process_on_the_union(tmp_path):
    run_ddp_script("ddp_lmc_script.py", tmp_path)
    metrics = [without_timings(json.loads((tmp_path / f"metrics_rank{r}.json").read_text())) for r in (0, 1)]
    assert metrics[0]["landscape/lmc/barrier"] == metrics[1]["landscape/lmc/barrier"]
    union = [b for r in (0, 1) for b in torch.load(tmp_path / f"probe_rank{r}.pt")]
    start, end = (torch.load(tmp_path / f"weights_step{s}.pt") for s in (2, 4))
    model = ClassifierModule(dropout=0.0).double()

    def loss_at(alpha):
        model.load_state_dict(interpolate_state(start, end, alpha))
        recompute_batchnorm(model, union, loss_of)  # the mean of per-batch statistics over all four batches
        model.eval()
        with torch.no_grad():
            return sum(float(loss_of(model, b)) * len(b[1]) for b in union) / sum(len(b[1]) for b in union)

    expected = interpolation_barrier(loss_at, num_alphas=5, refine_steps=1)
    assert metrics[0]["landscape/lmc/loss_start"] == pytest.approx(expected.losses[0], rel=1e-9)
    assert metrics[0]["landscape/lmc/loss_end"] == pytest.approx(expected.losses[-1], rel=1e-9)
    assert metrics[0]["landscape/lmc/barrier"] == pytest.approx(expected.chord, rel=1e-8, abs=1e-12)
