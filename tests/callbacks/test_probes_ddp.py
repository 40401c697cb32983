"""The shared probe set under 2-process DDP: each rank measures on its own slice, keeps one copy of it, and every
rank's slice comes back from rank 0's checkpoint."""

import pytest
import torch

from tests.helpers.ddp import run_ddp_script

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
]


def test_each_rank_keeps_its_slice_once_and_gets_it_back_after_a_resume(tmp_path):
    run_ddp_script("ddp_probes_script.py", tmp_path)
    first = [torch.load(tmp_path / f"first_rank{r}.pt") for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"resumed_rank{r}.pt") for r in (0, 1)]
    for rank in (0, 1):
        assert first[rank]["one_copy"] and first[rank]["hessian_reads_shared"]
        assert len(first[rank]["mine"]) == 4  # the rank monitor's four batches: the largest part
        for other in (0, 1):  # every rank holds every rank's slice (rank 0 checkpoints them all)
            assert all(
                torch.equal(a, b) for a, b in zip(first[other]["by_rank"][rank], first[rank]["mine"], strict=True)
            )
        # the resumed run measures on the same slice as before on each rank (restored, not recaptured)
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank]["mine"], first[rank]["mine"], strict=True))
        assert resumed[rank]["one_copy"]
    assert not torch.equal(first[0]["mine"][0], first[1]["mine"][0])  # the ranks' slices differ
