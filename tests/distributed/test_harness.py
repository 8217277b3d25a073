"""megamoe.testing.run_distributed on this machine: it picks NCCL only with a GPU per rank;
ranks on the CPU (gloo) have CUDA hidden, so DeepSpeed or torch never place rank r on a GPU
that does not exist; the run says which backend it used."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from megamoe.testing import BACKEND_LINE, default_backend, run_distributed


def _where(rank: int, world: int) -> dict:
    t = torch.full((1,), float(rank + 1))
    dist.all_reduce(t)  # CPU tensors work under either backend
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": torch.cuda.is_available(),
            "sum": float(t), "rank": int(os.environ["RANK"])}


@pytest.mark.distributed
def test_ranks_run_where_the_backend_says_and_it_is_reported(capfd):
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    backend = default_backend(2)
    results = run_distributed(_where, 2)
    assert [r["rank"] for r in results] == [0, 1] and all(r["sum"] == 3.0 for r in results)
    if backend == "gloo":
        assert all(r["visible"] == "" and not r["cuda"] for r in results)
    else:
        assert all(r["cuda"] for r in results)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # the parent's environment is left as it was
    err = capfd.readouterr().err
    assert f"{BACKEND_LINE} _where on 2 rank(s): {backend} (" in err
    sys.stderr.write(err)  # back into the test's output, for the suite's summary
