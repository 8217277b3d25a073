"""DeepSpeed's CPU communication op is built one process at a time.

On a CPU machine's first start every rank JIT-compiles DeepSpeed's shared-memory op into the
same folder; a rank could import the library before the compiling rank had written it. The
integration runs one-time work in turns (rank 0, then the first rank of each other host,
then the rest) and makes every rank raise when one fails, instead of leaving the others
waiting. Real gloo processes; the work each rank does is a real file on a shared folder.
"""
from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from megamoe.testing import run_distributed

pytest.importorskip("deepspeed")


def _turns_worker(rank: int, world: int, folder: str) -> dict:
    from megamoe.integrations.deepspeed import _in_turns

    seen: dict = {}
    marker = os.path.join(folder, "built")

    def work() -> None:
        if rank == 0:
            time.sleep(0.5)  # a slow build: the others must not start before it ends
            with open(marker, "w") as f:
                f.write("done")
        seen["marker_before_my_turn"] = os.path.exists(marker)

    _in_turns(work)
    dist.barrier()
    return seen


@pytest.mark.distributed
def test_one_time_work_runs_on_rank_zero_before_any_other_rank(tmp_path) -> None:
    results = run_distributed(_turns_worker, 3, str(tmp_path))
    assert all(r["marker_before_my_turn"] for r in results)
    assert (tmp_path / "built").read_text() == "done"


def _failing_turn_worker(rank: int, world: int) -> dict:
    from megamoe.integrations.deepspeed import _in_turns

    called = []

    def work() -> None:
        called.append(rank)
        if rank == 0:
            raise OSError("compiler missing")

    try:
        _in_turns(work)
    except Exception as exc:  # every rank must get here, none may hang in a later turn
        return {"error": f"{type(exc).__name__}: {exc}", "called": called}
    return {"error": None, "called": called}


@pytest.mark.distributed
def test_a_failed_turn_raises_on_every_rank_and_stops_the_later_turns() -> None:
    results = run_distributed(_failing_turn_worker, 3, timeout_s=120)
    assert results[0] == {"error": "OSError: compiler missing", "called": [0]}
    for r in results[1:]:
        assert r["error"] == "RuntimeError: rank 0 failed: OSError: compiler missing"
        assert r["called"] == []


def _shm_worker(rank: int, world: int) -> dict:
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch

    from megamoe.integrations import deepspeed as mds

    assert mds._build_comm_op_in_turns()  # a CPU machine: DeepSpeed will use its shared-memory op
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    named_before = os.path.exists(mds._shm_buffer_path(rank))
    mds._unlink_shm_buffer()
    dist.barrier()  # every rank has removed its name
    named_after = [os.path.exists(mds._shm_buffer_path(r)) for r in range(world)]
    # The op's all-reduce goes through the buffers the ranks mapped before their names went.
    t = torch.arange(4, dtype=torch.float32) * (rank + 1)
    ds_comm.inference_all_reduce(t)
    return {"named_before": named_before, "named_after": named_after, "sum": t}


@pytest.mark.distributed
def test_deepspeed_shared_memory_buffers_leave_no_file_behind_and_still_reduce() -> None:
    import torch

    # LOCAL_SIZE = world size (as the deepspeed launcher sets it): DeepSpeed maps one buffer per rank.
    results = run_distributed(_shm_worker, 2, env={"LOCAL_SIZE": "2"})
    for r in results:
        assert r["named_before"]  # DeepSpeed made the file this build expects (the name format holds)
        assert r["named_after"] == [False, False]
        torch.testing.assert_close(r["sum"], torch.arange(4, dtype=torch.float32) * 3)
