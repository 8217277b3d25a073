"""Shared pytest setup: deterministic seeds and single-threaded math for stable timings; the
summary lists which backend (NCCL on GPUs, or gloo on the CPU) each distributed test used."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU the Triton kernels (megamoe.kernels) run under Triton's interpreter, which is
# chosen when triton is first imported: switch it on here, before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.pluginmanager.register(_BackendSummary(), "megamoe-backend-summary")
    config.addinivalue_line("markers", "distributed: spawns real torch.distributed processes")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



class _BackendSummary:
    """Collects the line megamoe.testing prints per distributed run; lists them at the end."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report):
        from megamoe.testing import BACKEND_LINE

        for line in (report.capstderr or "").splitlines():
            if line.startswith(BACKEND_LINE) and (report.nodeid, line) not in self.lines:
                self.lines.append((report.nodeid, line))

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.section("distributed backends")
            for nodeid, line in self.lines:
                terminalreporter.write_line(f"{nodeid}: {line.split(' ', 1)[1]}")
