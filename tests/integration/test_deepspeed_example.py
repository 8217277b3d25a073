"""The README's DeepSpeed user script (examples/deepspeed_moe.py), run as a user runs it.

- The README shows the file verbatim (so the two cannot drift apart).
- 1 process (no launcher: the script makes a one-process group), ds_config as a dict, and
  again with the same config as a JSON file path: identical losses, the loss falls, and the
  held-out loss after save + load equals the one before.
- 2 gloo processes under torchrun, EP=2, ZeRO-3: the same losses as the 1-process run (the
  global batch is the same), the same save/load round trip, and none of
  DeepSpeed's "unknown inputs or outputs type" warning that a non-dict model output causes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "deepspeed_moe.py")
LOSS_RE = re.compile(r"^step (\d+) loss ([0-9.]+)$", re.M)
ROUND_TRIP_RE = re.compile(r"held-out loss ([0-9.]+) before, ([0-9.]+) after")


def test_readme_shows_the_script_verbatim():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    script = open(SCRIPT, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert script in blocks, "the README's DeepSpeed script differs from examples/deepspeed_moe.py"


def _run(cmd: list[str], tmp_path) -> tuple[list[float], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = [float(v) for _, v in LOSS_RE.findall(proc.stdout)]
    (before, after), = ROUND_TRIP_RE.findall(proc.stdout)
    assert before == after, f"save + load changed the held-out loss: {before} -> {after}"
    return losses, out


ARGS = ["--steps", "6", "--batch", "8"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return _run([sys.executable, SCRIPT, *ARGS, "--out", str(tmp / "ckpt")], tmp)


@pytest.mark.slow
def test_one_process_dict_config_learns(one_process):
    losses, out = one_process
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert "Setting accelerator to CPU" not in out and "Warning" not in out, out[-3000:]


@pytest.mark.slow
def test_json_config_path_gives_the_same_run(one_process, tmp_path):
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
              "bf16": {"enabled": False},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}}}
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    losses, _ = _run([sys.executable, SCRIPT, *ARGS, "--ds-config", "ds_config.json", "--out", "ckpt"], tmp_path)
    assert losses == one_process[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_ep2_zero3_match_one_process(one_process, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *ARGS,
           "--ep-size", "2", "--zero-stage", "3", "--out", "ckpt"]
    losses, out = _run(cmd, tmp_path)
    # rtol 1e-3: the first step agrees to 1e-6; Adam's early steps divide by tiny second moments,
    # so the rounding of another reduction order grows to ~2e-4 by step 6. (The gradient math
    # itself is checked with SGD in tests/distributed/test_ep_deepspeed.py.)
    assert losses[0] == pytest.approx(one_process[0][0], rel=1e-5)
    assert losses == pytest.approx(one_process[0], rel=1e-3)
    assert "unknown inputs or outputs type" not in out
    assert "FutureWarning" not in out, out[-3000:]
