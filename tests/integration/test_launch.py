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
    cfg.write_text("train: {steps: 1}\nparallel: {ep_size: 2}\n")  # a valid training config (EP=2)
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    return str(cfg), str(hosts)


def command_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


TRAIN = ["-m", "megamoe.cli", "train"]


def test_deepspeed_dry_run_two_nodes(files, launch):
    cfg, hosts = files
    res = launch("deepspeed", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--hostfile", hosts, cfg,
                 "model.moe.num_experts=8", "train.output_dir=two words")
    assert res.returncode == 0, res.stderr
    (cmd,) = command_lines(res.stdout)
    assert cmd == [PY, "-m", "deepspeed.launcher.runner", "--hostfile", hosts, "--num_nodes", "2",
                   "--master_addr", "node-a", "--num_gpus", "8", "--master_port", "29500", "--no_local_rank",
                   "--module", "megamoe.cli", "train", "--config", cfg, "model.moe.num_experts=8",
                   "train.output_dir=two words"]


def test_torchrun_dry_run_two_nodes(files, launch):
    cfg, _ = files
    res = launch("torchrun", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--master-addr", "node-a",
                 "--master-port", "6000", cfg, "train.lr=0.1")
    assert res.returncode == 0, res.stderr
    cmds = command_lines(res.stdout)
    assert len(cmds) == 2
    for node, cmd in enumerate(cmds):
        assert cmd == [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                       "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:6000",
                       "--rdzv-id", "megamoe", *TRAIN, "--config", cfg, "train.lr=0.1"]


def test_slurm_dry_run_two_nodes(files, tmp_path, launch):
    cfg, _ = files
    out = str(tmp_path / "job.sbatch")
    res = launch("slurm", "--dry-run", "--nnodes", "2", "--gpus-per-node", "8", "--sbatch-out", out,
                 "--sbatch-arg=--partition=gpu", cfg, "train.lr=0.1")
    assert res.returncode == 0, res.stderr
    # The only command is `sbatch FILE`, and FILE exists: the printed text runs as printed.
    assert command_lines(res.stdout) == [["sbatch", out]]
    assert os.access(out, os.X_OK)
    lines = open(out).read().splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert all(f"#   {line}" in res.stdout for line in lines)  # shown, as comments
    (srun,) = [line for line in lines if line.startswith("srun ")]
    argv = shlex.split(srun)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert argv[3:] == [PY, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--nproc-per-node", "8",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id",
                        "$SLURM_JOB_ID", *TRAIN, "--config", cfg, "train.lr=0.1"]


@pytest.mark.parametrize("where", ["config", "a directory"])
def test_slurm_sbatch_out_never_overwrites_the_config(files, tmp_path, launch, where):
    cfg, _ = files
    before = open(cfg).read()
    out = cfg if where == "config" else str(tmp_path)
    res = launch("slurm", "--dry-run", "--sbatch-out", out, cfg)
    assert res.returncode != 0 and "--sbatch-out" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert ("is the input" in res.stderr) == (where == "config")
    assert open(cfg).read() == before


def test_slurm_default_sbatch_path_is_under_runs(files, tmp_path, monkeypatch, launch):
    cfg, _ = files
    monkeypatch.chdir(tmp_path)
    res = launch("slurm", "--dry-run", cfg)
    assert res.returncode == 0, res.stderr
    path = str(tmp_path / "runs" / "launch" / "run.megamoe.sbatch")
    assert command_lines(res.stdout) == [["sbatch", path]] and os.path.isfile(path)


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
    ("deepspeed", ["--gpus-per-node", "8", "parallel.ep_size=3"], "parallel.ep_size=3 does not fit the world size 8"),
    ("torchrun", ["--local-cpu", "--nproc", "1"], "parallel.ep_size=2 does not fit the world size 1"),
    ("deepspeed", ["--local-cpu", "parallel.dist_backend=nccl"], "cannot run with --local-cpu"),
    ("torchrun", ["model.num_expertz=8"], "unknown config key 'model.num_expertz'"),
])
def test_bad_input_is_reported(files, launch, kind, args, message):
    cfg, _ = files
    res = launch(kind, "--dry-run", *args, cfg)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_bad_override_and_missing_config(files, launch):
    cfg, _ = files
    res = launch("torchrun", "--dry-run", cfg, "noequals")
    assert res.returncode == 2 and "got 2 arguments that are not key=value" in res.stderr
    res = launch("torchrun", "--dry-run", cfg + ".missing")
    assert res.returncode == 2 and "does not exist" in res.stderr


# One wrapper is enough here (each start-up imports torch); torchrun.sh also runs for real below.
@pytest.mark.parametrize("kind", ["slurm"])
def test_shell_wrappers_print_the_same_commands(files, launch, kind):
    cfg, hosts = files
    args = ["--dry-run", "--nnodes", "2", "--hostfile", hosts, "--master-addr", "node-a", cfg, "train.steps=2"]
    res = launch_sh(kind, *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout == launch(kind, *args).stdout


def test_local_cpu_dry_run_matches_what_runs(files, launch):
    cfg, _ = files
    res = launch("deepspeed", "--dry-run", "--local-cpu", cfg)
    assert res.returncode == 0, res.stderr
    (cmd,) = command_lines(res.stdout)
    assert cmd[:4] == ["CUDA_VISIBLE_DEVICES=", "DS_ACCELERATOR=cpu", "MEGAMOE_DIST_BACKEND=gloo", "OMP_NUM_THREADS=1"]
    assert cmd[4:11] == [PY, "-m", "deepspeed.launcher.runner", "--quiet", "--num_gpus", "2", "--master_port"]


def test_options_and_overrides_may_be_interleaved(files, launch):
    cfg, _ = files
    want = launch("torchrun", "--dry-run", "--local-cpu", "--master-port", "7000", cfg, "train.steps=5").stdout
    for order in ([cfg, "--local-cpu", "train.steps=5", "--dry-run", "--master-port", "7000"],
                  ["--dry-run", "--local-cpu", "train.steps=5", cfg, "--master-port", "7000"]):
        res = launch("torchrun", *order)
        assert res.returncode == 0 and res.stdout == want, res.stderr
    # `megamoe launch ...` (the CLI) parses the same way.
    from megamoe import cli
    assert cli.main(["launch", "torchrun", cfg, "--local-cpu", "train.steps=5", "--dry-run", "--master-port",
                     "7000"]) == 0


def test_printed_commands_carry_the_pythonpath_megamoe_needs(files, launch, monkeypatch):
    cfg, _ = files
    monkeypatch.setenv("PYTHONPATH", ROOT)
    (cmd,) = command_lines(launch("torchrun", "--dry-run", cfg).stdout)
    assert cmd[0] == f"PYTHONPATH={ROOT}"
    monkeypatch.setenv("PYTHONPATH", "")
    (cmd,) = command_lines(launch("torchrun", "--dry-run", cfg).stdout)
    assert cmd[0] == PY


@pytest.mark.parametrize("config,args,world", [
    ("gpu_1x80gb.yaml", ["--gpus-per-node", "1"], 1),
    ("gpu_8x80gb.yaml", [], 8),
    ("gpu_8x80gb.yaml", ["--nnodes", "2", "--master-addr", "node-a"], 16),
])
def test_gpu_configs_fit_their_world_size(launch, config, args, world):
    path = os.path.join(ROOT, "configs", config)
    res = launch("torchrun", "--dry-run", *args, path)
    assert res.returncode == 0, res.stderr
    assert f"--nproc-per-node {world if world < 8 else 8}" in res.stdout
    res = launch("torchrun", "--dry-run", "--gpus-per-node", "3", path)
    assert res.returncode == 2 and "does not fit the world size 3" in res.stderr if world > 1 else res.returncode == 0


def _bin_with(tmp_path, **scripts: str) -> str:
    """A PATH folder holding the tools the launch scripts use, plus the given stand-in programs."""
    import shutil
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "env"):
        os.symlink(shutil.which(tool), bindir / tool)
    for name, body in scripts.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    return str(bindir)


def test_launch_scripts_find_the_repository_environment(files, tmp_path):
    # A fresh shell: no venv activated, no MEGAMOE_PYTHON, no PYTHONPATH, a python3 on PATH
    # that cannot import megamoe.
    cfg, _ = files
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(venv_python):
        pytest.skip("no .venv in this checkout (tools/bootstrap.sh makes it)")
    path = _bin_with(tmp_path, python3="#!/bin/sh\nexit 1\n")
    res = subprocess.run(["/bin/bash", os.path.join(ROOT, "launch", "torchrun.sh"), "--dry-run", cfg],
                         capture_output=True, text=True, env={"PATH": path, "HOME": str(tmp_path)}, timeout=120)
    assert res.returncode == 0, res.stderr
    (cmd,) = command_lines(res.stdout)
    assert cmd[0] == venv_python


def test_launch_scripts_say_how_to_set_up_without_an_environment(files, tmp_path):
    import shutil
    cfg, _ = files
    repo = tmp_path / "repo"  # the launch scripts without a .venv beside them
    shutil.copytree(os.path.join(ROOT, "launch"), repo / "launch")
    path = _bin_with(tmp_path, python3="#!/bin/sh\nexit 1\n", python="#!/bin/sh\nexit 1\n")
    res = subprocess.run(["/bin/bash", str(repo / "launch" / "deepspeed.sh"), "--dry-run", cfg],
                         capture_output=True, text=True, env={"PATH": path, "HOME": str(tmp_path)}, timeout=60)
    assert res.returncode != 0
    assert "no Python environment with megamoe found" in res.stderr
    assert f"bash {repo}/tools/bootstrap.sh" in res.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_local_cpu_run_trains_with_expert_parallelism():
    res = launch_sh("torchrun", "--local-cpu", "--nproc", "2", "--script", "tools/smoke/ep_smoke_train.py",
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
