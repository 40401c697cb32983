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


def test_reduced_state_combines_each_name_by_its_declared_op():
    state = distributed.ReducedState()
    state.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
    for value in (3.0, 4.0):
        state.update("count", torch.tensor(value, dtype=torch.float64), "sum")
        state.update("peak", torch.tensor([value, -value]), "max")
        state.update("low", torch.tensor([value, -value]), "min")
        state.update("rows", torch.full((int(value), 2), value), "cat")
    assert "count" in state and "other" not in state and len(state) == 4
    assert state["count"].item() == 7.0 and state["count"].dtype == torch.float64
    assert state["peak"].tolist() == [4.0, -3.0] and state["low"].tolist() == [3.0, -4.0]
    assert state["rows"].shape == (7, 2) and state["rows"][:3].eq(3.0).all() and state["rows"][3:].eq(4.0).all()
    reduced = state.reduce({"extra": (torch.tensor(1.0), "sum")})
    assert set(reduced) == {"count", "peak", "low", "rows", "extra"}
    assert torch.equal(reduced["rows"], state["rows"]) and reduced["rows"] is not state["rows"]  # copies
    default = torch.zeros(2)
    state.add_state("fresh", default, "sum")
    state.update("fresh", torch.ones(2), "sum")
    assert default.tolist() == [0.0, 0.0]  # the default is copied, never written


def test_reduced_state_refuses_unknown_and_changed_ops():
    state = distributed.ReducedState()
    with pytest.raises(ValueError, match=r"`dist_reduce_fx` must be one of .*got 'mean' for 'a'"):
        state.add_state("a", torch.zeros(()), "mean")
    state.update("a", torch.zeros(()), "sum")
    with pytest.raises(ValueError, match=r"`dist_reduce_fx` of 'a' was declared 'sum', got 'max'"):
        state.update("a", torch.zeros(()), "max")
    with pytest.raises(ValueError, match=r"op 'cat' needs a tensor with a dim 0"):
        distributed.all_reduce_named({"b": (torch.zeros(()), "cat")})


def _state_phase(rank: int) -> dict[str, object]:
    """The second phase of the worker: ReducedState with "cat" rows of different lengths and a name one rank lacks."""
    state = distributed.ReducedState()
    rows = torch.arange(2 * (rank + 1) * 3, dtype=torch.float64).reshape(-1, 3) + 100 * rank
    state.update("rows", rows, "cat")  # rank 0: 2 rows, rank 1: 4 rows
    if rank == 0:
        state.update("only0/rows", torch.ones(1, 2, dtype=torch.int64), "cat")
        state.update("only0/count", torch.tensor(2.0), "sum")
    state.update("count", torch.tensor(float(rank + 1)), "sum")
    dumped: dict[str, object] = {k: v.tolist() for k, v in state.reduce().items()}
    try:  # "cat" rows of different widths are refused on both ranks
        distributed.all_reduce_named({"w": (torch.zeros(1, rank + 1), "cat")})
        dumped["mismatch"] = "no error"
    except ValueError as err:
        dumped["mismatch"] = str(err)
    return dumped


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
        Path(out, f"state_rank{rank}.json").write_text(json.dumps(_state_phase(rank)))
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
    states = [json.loads((tmp_path / f"state_rank{r}.json").read_text()) for r in (0, 1)]
    mismatch = [r.pop("mismatch") for r in states]
    assert states[0] == states[1]
    rows0 = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    rows1 = [[100.0 + 3 * i + j for j in range(3)] for i in range(4)]
    assert states[0] == {"rows": rows0 + rows1, "only0/rows": [[1, 1]], "only0/count": 2.0, "count": 3.0}
    assert all("declared 'w' differently" in m for m in mismatch)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(int(sys.argv[2]), sys.argv[1]), nprocs=2, join=True)
