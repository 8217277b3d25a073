"""Fixtures for the distributed tests: ``ep_runs`` shares one spawn per world size (see ep_runs.py)."""
from __future__ import annotations

import pytest

from ep_runs import run_worlds


@pytest.fixture(scope="session")
def ep_runs(tmp_path_factory):
    return run_worlds(str(tmp_path_factory.mktemp("ep_checkpoints")))
