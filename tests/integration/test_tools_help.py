"""Every script in tools/ (and its bench/, experiments/ and smoke/ folders) answers --help without running
anything or writing a file."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = sorted(os.path.relpath(os.path.join(folder, f), os.path.join(ROOT, "tools"))
               for folder, _, files in os.walk(os.path.join(ROOT, "tools")) for f in files if f.endswith(".py"))


def _tree(top: str) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, _, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_tools_help_writes_nothing(tmp_path):
    before = _tree(os.path.join(ROOT, "tools"))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def help_of(tool: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    # One tool per core at a time: each start is mostly importing torch.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for tool, res in zip(TOOLS, pool.map(help_of, TOOLS)):
            assert res.returncode == 0 and "usage:" in res.stdout, f"{tool}: {res.stderr[-2000:]}"
    assert _tree(os.path.join(ROOT, "tools")) == before, "a tool wrote into tools/ on --help"
    assert not list(tmp_path.iterdir()), f"a tool wrote into the working directory: {list(tmp_path.iterdir())}"
