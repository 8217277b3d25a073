"""Shared pytest setup: deterministic seeds and single-threaded math for stable timings."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU the Triton kernels (megamoe.kernels) run under Triton's interpreter, which is
# chosen when triton is first imported: switch it on here, before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: spawns real torch.distributed processes")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
