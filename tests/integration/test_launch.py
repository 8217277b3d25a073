"""Launchers: exact dry-run commands for 2 nodes x 8 GPUs, input errors, and a real local
CPU run (2 gloo processes doing EP=2 DeepSpeed ZeRO-2 steps) through launch/torchrun.sh.

Most checks call megamoe.train.launch.main in-process (the shell scripts only exec it);
one test goes through each shell wrapper, and the real run uses launch/torchrun.sh."""
from __future__ import annotations

import json
import re
import os
import shlex
import subprocess
import sys

import pytest

from megamoe.train import launch as launcher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def launch_sh(kind: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEGAMOE_PYTHON": PY}
    return subprocess.run(["bash", os.path.join(ROOT, "launch", f"{kind}.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def launch(capsys):
    def run(kind: str, *args: str) -> _Result:
        rc = launcher.main([kind, *args])
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)
    return run


@pytest.fixture()
def files(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 1\n")
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    return str(cfg), str(hosts)


def command_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


TRAIN = ["-m", "megamoe.cli", "train"]


def test_deepspeed_dry_run_two_nodes(files, launch):
    cfg, hosts = files
    res = launch("deepspeed", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--hostfile", hosts, cfg,
                 "model.num_experts=8", "name=two words")
    assert res.returncode == 0, res.stderr
    (cmd,) = command_lines(res.stdout)
    assert cmd == [PY, "-m", "deepspeed.launcher.runner", "--hostfile", hosts, "--num_nodes", "2",
                   "--master_addr", "node-a", "--num_gpus", "8", "--master_port", "29500", "--no_local_rank",
                   "--module", "megamoe.cli", "train", "--config", cfg, "model.num_experts=8", "name=two words"]


def test_torchrun_dry_run_two_nodes(files, launch):
    cfg, _ = files
    res = launch("torchrun", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--master-addr", "node-a",
                 "--master-port", "6000", cfg, "lr=0.1")
    assert res.returncode == 0, res.stderr
    cmds = command_lines(res.stdout)
    assert len(cmds) == 2
    for node, cmd in enumerate(cmds):
        assert cmd == [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                       "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:6000",
                       "--rdzv-id", "megamoe", *TRAIN, "--config", cfg, "lr=0.1"]


def test_slurm_dry_run_two_nodes(files, tmp_path, launch):
    cfg, _ = files
    out = str(tmp_path / "job.sbatch")
    res = launch("slurm", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--sbatch-out", out,
                 "--sbatch-arg=--partition=gpu", cfg, "lr=0.1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert ["sbatch", out] in command_lines("\n".join(lines[:2]))
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert argv[3:] == [PY, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--nproc-per-node", "8",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id",
                        "$SLURM_JOB_ID", *TRAIN, "--config", cfg, "lr=0.1"]
    assert not os.path.exists(out), "a dry run must not write the sbatch script"


def test_slurm_run_writes_an_executable_script_then_submits_it(files, tmp_path, monkeypatch):
    # A stand-in `sbatch` on PATH (a real executable, not a mock of our code) records what it got.
    cfg, _ = files
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$1.submitted"\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    out = tmp_path / "job.sbatch"
    assert launcher.main(["slurm", "--nnodes", "2", "--sbatch-out", str(out), cfg]) == 0
    assert os.access(out, os.X_OK)
    assert (tmp_path / "job.sbatch.submitted").read_text() == out.read_text()
    assert out.read_text().startswith("#!") and "srun " in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


@pytest.mark.parametrize("kind,args,message", [
    ("deepspeed", ["--nnodes", "2"], "--hostfile is required"),
    ("torchrun", ["--nnodes", "2"], "--master-addr"),
    ("torchrun", ["--nnodes", "2", "--master-addr", "a", "--node-rank", "2"], "--node-rank=2 is invalid"),
    ("slurm", ["--local-cpu"], "not slurm"),
    ("torchrun", ["--gpus-per-node", "0"], "--gpus-per-node=0 is invalid"),
])
def test_bad_input_is_reported(files, launch, kind, args, message):
    cfg, _ = files
    res = launch(kind, "--dry-run", *args, cfg)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_bad_override_and_missing_config(files, launch):
    cfg, _ = files
    res = launch("torchrun", "--dry-run", cfg, "noequals")
    assert res.returncode == 2 and "override 'noequals' is invalid" in res.stderr
    res = launch("torchrun", "--dry-run", cfg + ".missing")
    assert res.returncode == 2 and "does not exist" in res.stderr


# One wrapper is enough here (each start-up imports torch); torchrun.sh also runs for real below.
@pytest.mark.parametrize("kind", ["slurm"])
def test_shell_wrappers_print_the_same_commands(files, launch, kind):
    cfg, hosts = files
    args = ["--dry-run", "--nnodes", "2", "--hostfile", hosts, "--master-addr", "node-a", cfg, "a.b=1"]
    res = launch_sh(kind, *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == launch(kind, *args).stdout


def test_local_cpu_dry_run_matches_what_runs(files, launch):
    cfg, _ = files
    res = launch("deepspeed", "--dry-run", "--local-cpu", cfg)
    assert res.returncode == 0, res.stderr
    (cmd,) = command_lines(res.stdout)
    assert cmd[:3] == ["CUDA_VISIBLE_DEVICES=", "MEGAMOE_DIST_BACKEND=gloo", "OMP_NUM_THREADS=1"]
    assert cmd[3:9] == [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"]


@pytest.mark.distributed
@pytest.mark.slow
def test_local_cpu_run_trains_with_expert_parallelism():
    res = launch_sh("torchrun", "--local-cpu", "--nproc", "2", "--script", "tools/ep_smoke_train.py",
                 "configs/ep_smoke.yaml", "steps=3", timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Parsed by pattern, not by line: both ranks write to one pipe, so a result may share a line.
    results = [json.loads(m) for m in re.findall(r"EP_SMOKE_RESULT (\{[^{}]*\})", res.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["ep_size"] == 2 and len(r["losses"]) == 3
        assert r["losses"] == results[0]["losses"]
    losses = results[0]["losses"]
    assert losses[-1] < losses[0], f"loss did not fall on a repeated batch: {losses}"
