"""The README's Python blocks run as printed (in a scratch directory, one process each).

Known exception, by its first line: the DeepSpeed script (examples/deepspeed_moe.py, run by
test_deepspeed_example.py, which also checks that the README shows it verbatim).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_HERE = ('"""Train a megamoe MoE language model with DeepSpeed',)  # test_deepspeed_example.py
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
                                re.S) if not b.startswith(NOT_HERE)]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_readme_python_block_runs(block, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "a README block wrote into the working directory"
