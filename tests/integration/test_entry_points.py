"""The DeepSpeed backend on one process through every entry point, and the GPU configs scaled
down to the CPU.

One process, DeepSpeed backend (``parallel.backend=deepspeed``, EP=1, ZeRO-1): started as
``megamoe train``, ``torchrun --nproc_per_node 1``, ``launch/deepspeed.sh --local-cpu --nproc 1``
and ``launch/torchrun.sh --local-cpu --nproc 1``. Each must train the same losses as the
torch backend on one process (the same model, data, AdamW and schedule: DeepSpeed only wraps
it), to rtol 1e-5. The export command the job prints is then run exactly as printed, from a
shell without the environment activated.

``configs/gpu_1x80gb.yaml`` and ``configs/gpu_8x80gb.yaml`` keep every setting but the model
size, data size and step count (and, for the 8-GPU one, EP=8 -> EP=2 on 2 CPU processes),
and train two steps, so the GPU configs cannot rot on a CPU-only CI.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from tiny_run import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")

SMALL = [*TINY_RUN, "train.lr=0.01", "train.plots=false", "train.tensorboard=false", "train.steps=4",
         "train.eval_interval=4", "train.save_interval=4", "parallel.ep_size=1"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), MEGAMOE_PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (a run must not leave one behind)."""
    folder = "/dev/shm"
    return {n for n in os.listdir(folder) if n.startswith("deepspeed_allreduce_buffer")} if os.path.isdir(folder) else set()


def _losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def _train_args(out_dir, cache_dir, *extra) -> list[str]:
    return ["--config", TINY_CFG, *SMALL, f"train.output_dir={out_dir}", f"data.cache_dir={cache_dir}", *extra]


ENTRY_POINTS = {
    "megamoe train": lambda args: [sys.executable, "-m", "megamoe.cli", "train", *args],
    "torchrun --nproc_per_node 1": lambda args: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "1", "-m", "megamoe.cli", "train", *args],
    "launch/deepspeed.sh --local-cpu --nproc 1": lambda args: [
        "bash", os.path.join(ROOT, "launch", "deepspeed.sh"), "--local-cpu", "--nproc", "1", *args[1:]],
    "launch/torchrun.sh --local-cpu --nproc 1": lambda args: [
        "bash", os.path.join(ROOT, "launch", "torchrun.sh"), "--local-cpu", "--nproc", "1", *args[1:]],
}


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("torch") / "run"
    _run(ENTRY_POINTS["megamoe train"](_train_args(out, cache_dir, "parallel.backend=torch")))
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_deepspeed_backend_on_one_process(entry, tmp_path, cache_dir, torch_reference):
    out = tmp_path / "run"
    shm_before = _shm_buffers()
    proc = _run(ENTRY_POINTS[entry](_train_args(out, cache_dir, "parallel.backend=deepspeed")))
    assert _shm_buffers() <= shm_before  # DeepSpeed's shared-memory buffers went with the process
    got = _losses(out)
    assert len(got) == 4 and got == pytest.approx(torch_reference, rel=1e-5), (got, torch_reference)
    meta = json.load(open(out / "checkpoints" / "step_00000004" / "megamoe_config.json"))
    assert meta["backend"] == "deepspeed" and meta["world_size"] == 1
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # DeepSpeed's banner is silenced
    assert "built successfully" not in proc.stdout + proc.stderr
    if entry == "megamoe train":
        # The export hint runs as printed from a shell that has no environment activated.
        (line,) = [ln for ln in proc.stdout.splitlines() if "export to HF:" in ln]
        command = line.split("export to HF:", 1)[1].strip()
        done = subprocess.run(["/bin/bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})
        assert done.returncode == 0, done.stderr[-3000:]
        assert os.path.isfile(out / "hf" / "config.json")
        (line,) = [ln for ln in proc.stdout.splitlines() if "tensorboard:" in ln]
        program = shlex.split(line.split("tensorboard:", 1)[1])[0]  # the environment's own, by path
        assert os.access(os.path.join(ROOT, program), os.X_OK), line


SHRINK = ["model.vocab_size=256", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
          "model.num_kv_heads=2", "model.max_seq_len=32", "model.moe.num_experts=4",
          "model.moe.experts.intermediate_size=32",
          "data.embedded_docs=300", "data.seq_len=32", "data.eval_fraction=0.1", "train.micro_batch_size=2",
          "train.steps=2", "train.warmup_steps=1", "train.eval_interval=2", "train.save_interval=2",
          "train.eval_max_batches=2", "train.progress=false", "train.threads=1", "train.plots=false",
          "train.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.parametrize("config,launch", [
    ("gpu_1x80gb.yaml", []),  # one process, `megamoe train`
    ("gpu_8x80gb.yaml", ["--local-cpu", "--nproc", "2"]),  # EP=8 scaled to EP=2 on 2 CPU processes
])
def test_gpu_configs_train_scaled_down_on_the_cpu(config, launch, tmp_path, cache_dir):
    out = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs", config), *SHRINK, f"train.output_dir={out}",
            f"data.cache_dir={cache_dir}"]
    if launch:
        shm_before = _shm_buffers()
        _run(["bash", os.path.join(ROOT, "launch", "deepspeed.sh"), *launch, *args[1:], "parallel.ep_size=2"])
        assert _shm_buffers() <= shm_before
    else:
        _run([sys.executable, "-m", "megamoe.cli", "train", *args])
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < x < 10 for x in losses), losses
    meta = json.load(open(out / "checkpoints" / "step_00000002" / "megamoe_config.json"))
    full = meta["train_config"]
    assert full["train"]["precision"] == "bf16" and full["model"]["gradient_checkpointing"] is True
    assert full["parallel"]["zero_stage"] == (1 if "1x" in config else 2)
