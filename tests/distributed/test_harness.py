"""The multi-process test harness: results in rank order, a raising rank's traceback, hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks


def _echo(rank, scale, *, offset):
    t = torch.full((2,), float(rank))
    dist.all_reduce(t)  # the harness started the process group
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                      "OMP_NUM_THREADS", "EXTRA")}
    return {"rank": rank, "dist_rank": dist.get_rank(), "value": scale * rank + offset,
            "sum": t, "env": env}


def _raise_on_one(rank):
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # left waiting for a peer that is gone


def _hang_on_one(rank, pid_dir):
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(600)


def test_results_come_back_in_rank_order():
    out = run_ranks(_echo, 2, 10, offset=1, env={"EXTRA": "x"})
    assert [o["rank"] for o in out] == [o["dist_rank"] for o in out] == [0, 1]
    assert [o["value"] for o in out] == [1, 11]
    for rank, o in enumerate(out):
        assert torch.equal(o["sum"], torch.ones(2))
        assert o["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                            "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "EXTRA": "x"}


def test_a_raising_rank_gives_its_traceback():
    with pytest.raises(AssertionError) as err:
        run_ranks(_raise_on_one, 2)
    msg = str(err.value)
    assert msg.index("rank 1 raised:") < msg.find("rank 0")  # the first failure comes first
    assert "Traceback (most recent call last)" in msg and "_raise_on_one" in msg
    assert "ValueError: boom from rank 1" in msg


def test_a_hanging_rank_is_killed(tmp_path):
    with pytest.raises(AssertionError, match=r"killed rank\(s\) \[.*1\]: still running after 10 s"):
        run_ranks(_hang_on_one, 2, str(tmp_path), backend=None, timeout=10)
    pid = int((tmp_path / "1.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # nothing left behind


def test_rejects_a_local_function():
    def local(rank):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_ranks(local, 2)
