"""all_reduce_named: reduction by declared name and op, in one process and over two gloo processes whose names differ.

Run as a script (``python tests/core/test_distributed.py OUT``) it is the two-process worker the test launches in a
subprocess with a timeout, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_landscape.core import distributed

ROOT = Path(__file__).resolve().parents[2]


def test_one_process_returns_copies_and_checks_the_ops():
    a = torch.tensor(2.0)
    out = distributed.all_reduce_named({"a": (a, "sum"), "b": (torch.tensor([1.0, 3.0]), "max")})
    assert out["a"] == 2.0 and out["a"] is not a
    assert torch.equal(out["b"], torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match=r"`values\['a'\]` op must be one of"):
        distributed.all_reduce_named({"a": (a, "mean")})


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 1 never recorded "only0" and rank 0 never recorded "only1"; the dict orders differ too
        if rank == 0:
            values = {
                "z/max": (torch.tensor(1.0), "max"),
                "only0": (torch.tensor(5.0, dtype=torch.float64), "sum"),
                "a/sum": (torch.tensor([1.0, 2.0]), "sum"),
                "low": (torch.tensor(4, dtype=torch.int64), "min"),
            }
        else:
            values = {
                "a/sum": (torch.tensor([10.0, 20.0]), "sum"),
                "low": (torch.tensor(-3, dtype=torch.int64), "min"),
                "only1": (torch.tensor(-7.0), "max"),
                "z/max": (torch.tensor(-2.0), "max"),
            }
        result = distributed.all_reduce_named(values)
        dumped = {k: v.tolist() for k, v in result.items()}
        try:  # a name declared with different shapes on the two ranks is refused on both
            distributed.all_reduce_named({"x": (torch.zeros(rank + 1), "sum")})
            dumped["mismatch"] = "no error"
        except ValueError as err:
            dumped["mismatch"] = str(err)
        Path(out, f"rank{rank}.json").write_text(json.dumps(dumped))
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_by_name_with_identities_for_missing_names(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(tmp_path), str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"2-process all_reduce_named hung: {err}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    mismatch = [r.pop("mismatch") for r in results]
    assert results[0] == results[1]
    assert results[0] == {"a/sum": [11.0, 22.0], "low": -3, "only0": 5.0, "only1": -7.0, "z/max": 1.0}
    assert all("declared 'x' differently" in m for m in mismatch)
    # "only1": the rank without it contributed -inf to the max, not 0 (which would give 0)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(int(sys.argv[2]), sys.argv[1]), nprocs=2, join=True)
