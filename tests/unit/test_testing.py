"""The distributed test harness's choice of backend (megamoe.testing), without spawning."""
from __future__ import annotations

import pytest
import torch

from megamoe.testing import rank_device, run_distributed, select_backend


@pytest.mark.parametrize("world,gpus,backend", [
    (1, 0, "gloo"), (2, 0, "gloo"), (2, 1, "gloo"),  # the H100 box: 1 GPU, 2 ranks -> CPU
    (1, 1, "nccl"), (2, 2, "nccl"), (4, 8, "nccl"), (8, 8, "nccl"), (16, 8, "gloo"),
])
def test_nccl_only_with_a_gpu_per_rank(world, gpus, backend):
    assert select_backend(world, gpus) == backend


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="world_size=0 is invalid"):
        select_backend(0, 8)
    with pytest.raises(ValueError, match="backend='mpi' is invalid"):
        run_distributed(print, 2, backend="mpi")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"needs one GPU per rank: {gpus + 1} ranks, {gpus} GPU"):
        run_distributed(print, gpus + 1, backend="nccl")


def test_rank_devices():
    assert rank_device(3, "nccl") == torch.device("cuda", 3)
    assert rank_device(3, "gloo") == torch.device("cpu")
