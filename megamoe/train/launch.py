"""Multi-node launch command lines: the deepspeed launcher, torchrun, and SLURM (sbatch + srun).

``megamoe launch {deepspeed,torchrun,slurm} [options] CONFIG [key=value ...]`` builds the
command that starts ``python -m megamoe.cli train --config CONFIG key=value ...`` on every
GPU of every node, prints it with ``--dry-run``, and otherwise runs it. The shell scripts
in ``launch/`` are thin wrappers around this module, so the printed commands are exactly
the ones executed.

- deepspeed: one command on the head node; the deepspeed runner reaches the other nodes
  listed in ``--hostfile`` (``host slots=N`` lines) over pdsh/ssh.
- torchrun: the same command on every node (c10d rendezvous at ``--master-addr``); with
  ``--node-rank`` it runs this node's part, otherwise ``--dry-run`` lists it per node.
- slurm: an sbatch script whose single ``srun`` task per node runs torchrun; the
  rendezvous host is the job's first node.
- ``--local-cpu``: one node, ``--nproc`` processes (default 2) on the CPU with gloo
  (``MEGAMOE_DIST_BACKEND=gloo``, no CUDA devices); works with deepspeed and torchrun.

Before anything runs (``--dry-run`` included) the training config and its overrides are
loaded and checked against the world size the launch creates (``--nnodes`` x
``--gpus-per-node``, or ``--nproc``), so an impossible layout fails here, not on the nodes.
Every printed command runs as printed from a fresh shell: the interpreter is this one (by
absolute path), the environment it needs (``PYTHONPATH`` when megamoe comes from it) is
spelled out, and the sbatch script a SLURM dry run names is written (by default under
``runs/launch/``). Options and ``key=value`` overrides may come in any order.

``--script PATH`` replaces the training entry by a Python script that receives
``--config CONFIG key=value ...`` (used by the smoke test and for custom entry points);
its config is not checked here.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from megamoe.atomic import atomic_write_text

KINDS = ("deepspeed", "torchrun", "slurm")
OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*=.*$", re.S)
DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """Bad launcher input; the message says which argument and what is allowed."""


@dataclass
class LaunchPlan:
    """What to run: ``commands`` (argv lists) with ``env`` additions, or an sbatch script."""

    kind: str
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    sbatch_script: str | None = None
    sbatch_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The commands as shell lines; everything else (notes, the sbatch script) is a comment,
        so the whole text can be pasted into a shell."""
        lines = [f"# {n}" for n in self.notes]
        if self.sbatch_script is not None:
            lines += [f"# {self.sbatch_path} (written):",
                      *[f"#   {line}" for line in self.sbatch_script.rstrip("\n").splitlines()]]
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        for cmd in self.commands:
            lines.append((prefix + " " if prefix else "") + shlex.join(cmd))
        return "\n".join(lines)

    def write_files(self) -> None:
        """Write what the commands read (the sbatch script), atomically."""
        if self.sbatch_script is not None:
            atomic_write_text(self.sbatch_path, self.sbatch_script, executable=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which launcher to use")
    parser.add_argument("items", nargs="+", metavar="CONFIG [key=value ...]",
                        help="training config (YAML) passed to the entry as --config, then config overrides")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="processes per node (default 8)")
    parser.add_argument("--hostfile", help="deepspeed: hostfile with 'host slots=N' lines (needed for nnodes > 1)")
    parser.add_argument("--master-addr", help="torchrun/deepspeed: rendezvous host for nnodes > 1")
    parser.add_argument("--master-port", type=int, default=None,
                        help=f"rendezvous port (default {DEFAULT_PORT}; with --local-cpu a free local port)")
    parser.add_argument("--node-rank", type=int, help="torchrun: run only this node's command")
    parser.add_argument("--job-id", default="megamoe", help="torchrun rendezvous id (default 'megamoe')")
    parser.add_argument("--job-name", default="megamoe", help="slurm job name")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra #SBATCH line, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    parser.add_argument("--sbatch-out", help="slurm: where to write the sbatch script "
                                             "(default: runs/launch/<config name>.<job name>.sbatch)")
    parser.add_argument("--local-cpu", action="store_true", help="run --nproc processes on this machine's CPU (gloo)")
    parser.add_argument("--nproc", type=int, default=2, help="processes in --local-cpu mode (default 2)")
    parser.add_argument("--script", help="run this Python script instead of 'megamoe.cli train'")
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")
    parser.add_argument("--resume", action="store_true", help="pass --resume to the training entry")
    parser.add_argument("--overwrite", action="store_true", help="pass --overwrite to the training entry")


def _positive(name: str, value: int) -> None:
    if value is None or value < 1:
        raise LaunchError(f"{name}={value} is invalid: must be a positive integer")


def _split_items(args: argparse.Namespace) -> None:
    """``items`` -> ``config`` (the one argument that is not key=value) and ``overrides``."""
    if hasattr(args, "config"):
        return
    plain = [item for item in args.items if not OVERRIDE_RE.match(item)]
    if len(plain) != 1:
        what = "no config" if not plain else f"{len(plain)} arguments that are not key=value: {plain}"
        raise LaunchError(f"expected one CONFIG and key=value overrides, got {what}; overrides are key=value "
                          "with a dotted key, e.g. model.moe.num_experts=8")
    args.config = plain[0]
    args.overrides = [item for item in args.items if OVERRIDE_RE.match(item)]


def _world_size(args: argparse.Namespace) -> int:
    return args.nproc if args.local_cpu else args.nnodes * args.gpus_per_node


def _check_training_config(args: argparse.Namespace) -> None:
    """Load CONFIG with the overrides and check it against the launch's world size."""
    from megamoe.config import ConfigError
    from megamoe.train.config import check_world_size, load_config

    world = _world_size(args)
    try:
        cfg = load_config(args.config, args.overrides)
        check_world_size(cfg, world)
    except ConfigError as exc:
        raise LaunchError(f"{args.config} with {world} process(es): {exc}") from None
    if args.local_cpu:
        if cfg.parallel.dist_backend == "nccl":
            raise LaunchError("parallel.dist_backend='nccl' cannot run with --local-cpu (CPU processes, gloo); "
                              "use parallel.dist_backend=auto")
        if cfg.train.device == "cuda":
            raise LaunchError("train.device='cuda' cannot run with --local-cpu (CUDA is hidden); use train.device=auto")


def _python_env() -> dict[str, str]:
    """PYTHONPATH, when megamoe is importable here only through it (the printed commands
    must carry it to run from a fresh shell)."""
    import megamoe

    root = os.path.dirname(os.path.dirname(os.path.abspath(megamoe.__file__)))
    entries = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if root in entries else {}


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """Parse a deepspeed hostfile: ``host slots=N`` per line, '#' comments."""
    if not os.path.isfile(path):
        raise LaunchError(f"--hostfile {path!r} does not exist")
    hosts = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
            if not m:
                raise LaunchError(f"{path}:{num}: {line!r} is not 'host slots=N'")
            hosts.append((m.group(1), int(m.group(2))))
    return hosts


def _entry(args: argparse.Namespace, config: str, *, launcher: str) -> list[str]:
    """The per-process program and its arguments, in the launcher's syntax."""
    flags = [f for f, on in (("--resume", getattr(args, "resume", False)),
                             ("--overwrite", getattr(args, "overwrite", False))) if on]
    tail = ["--config", config, *flags, *args.overrides]
    if args.script:
        script = os.path.abspath(args.script)
        if not os.path.isfile(script):
            raise LaunchError(f"--script {args.script!r} does not exist")
        return [script, *tail]
    module = ["--module"] if launcher == "deepspeed" else ["-m"]
    return [*module, "megamoe.cli", "train", *tail]


def _torchrun(args: argparse.Namespace, nnodes: int, nproc: int, *, rdzv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node",
            str(nproc), *rdzv]


def build_plan(args: argparse.Namespace) -> LaunchPlan:
    """Validate the arguments and the training config, and build the commands (no side effects)."""
    args = argparse.Namespace(**vars(args))  # the config split and the port default are resolved on a copy
    _split_items(args)
    if not os.path.isfile(args.config):
        raise LaunchError(f"config {args.config!r} does not exist")
    config = os.path.abspath(args.config)
    _positive("--nnodes", args.nnodes)
    _positive("--gpus-per-node", args.gpus_per_node)
    _positive("--nproc", args.nproc)
    if not args.script:
        _check_training_config(args)
    if args.local_cpu:
        plan = _local_cpu_plan(args, config)
    else:
        if args.master_port is None:
            args.master_port = DEFAULT_PORT
        plan = {"deepspeed": _deepspeed_plan, "torchrun": _torchrun_plan, "slurm": _slurm_plan}[args.kind](args, config)
    plan.env.update(_python_env())
    return plan


def _local_cpu_plan(args: argparse.Namespace, config: str) -> LaunchPlan:
    if args.kind == "slurm":
        raise LaunchError("--local-cpu works with the deepspeed and torchrun launchers, not slurm")
    if args.nnodes != 1:
        raise LaunchError(f"--nnodes={args.nnodes} is invalid with --local-cpu: local mode is one node")
    # DS_ACCELERATOR=cpu: CUDA is hidden, so DeepSpeed would pick the CPU anyway, but with a
    # warning banner in every process.
    env = {"MEGAMOE_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if args.master_port is None:
        # Not a fixed 29500: a second local job, or anything else on this machine holding that
        # port, would make the rendezvous fail.
        from megamoe.parallel import free_port
        args.master_port = free_port()
    if args.kind == "deepspeed":
        # --quiet: the runner's per-process INFO lines and its "no hostfile" warning are noise on one
        # machine; a rank that fails is still reported (at error level).
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--quiet", "--num_gpus", str(args.nproc),
               "--master_port", str(args.master_port), "--no_local_rank",
               *_entry(args, config, launcher="deepspeed")]
    else:
        cmd = [*_torchrun(args, 1, args.nproc, rdzv=["--standalone"]), *_entry(args, config, launcher="torchrun")]
    return LaunchPlan(kind=args.kind, commands=[cmd], env=env,
                      notes=[f"local CPU: {args.nproc} processes, gloo"])


def _deepspeed_plan(args: argparse.Namespace, config: str) -> LaunchPlan:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if args.nnodes > 1:
        if not args.hostfile:
            raise LaunchError(f"--hostfile is required for the deepspeed launcher with --nnodes={args.nnodes}")
        hosts = read_hostfile(args.hostfile)
        if len(hosts) < args.nnodes:
            raise LaunchError(f"--hostfile {args.hostfile!r} lists {len(hosts)} hosts, --nnodes={args.nnodes}")
        short = [h for h, slots in hosts[:args.nnodes] if slots < args.gpus_per_node]
        if short:
            raise LaunchError(f"hosts {short} have fewer than --gpus-per-node={args.gpus_per_node} slots in "
                              f"{args.hostfile!r}")
        master = args.master_addr or hosts[0][0]
        cmd += ["--hostfile", os.path.abspath(args.hostfile), "--num_nodes", str(args.nnodes),
                "--master_addr", master]
    # The entry reads LOCAL_RANK from the environment; --no_local_rank keeps argv to CONFIG + overrides.
    cmd += ["--num_gpus", str(args.gpus_per_node), "--master_port", str(args.master_port), "--no_local_rank",
            *_entry(args, config, launcher="deepspeed")]
    return LaunchPlan(kind="deepspeed", commands=[cmd],
                      notes=[f"deepspeed: {args.nnodes} node(s) x {args.gpus_per_node} GPUs, run on the head node"])


def _torchrun_plan(args: argparse.Namespace, config: str) -> LaunchPlan:
    if args.nnodes > 1 and not args.master_addr:
        raise LaunchError(f"--master-addr (the rendezvous host) is required for torchrun with --nnodes={args.nnodes}")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node-rank={args.node_rank} is invalid: must be in [0, {args.nnodes})")
    nodes = range(args.nnodes) if args.node_rank is None else [args.node_rank]
    if args.nnodes == 1:
        rdzv = lambda node: ["--standalone"]  # noqa: E731
    else:
        rdzv = lambda node: ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",  # noqa: E731
                             f"{args.master_addr}:{args.master_port}", "--rdzv-id", args.job_id]
    cmds = [[*_torchrun(args, args.nnodes, args.gpus_per_node, rdzv=rdzv(n)), *_entry(args, config,
                                                                                      launcher="torchrun")]
            for n in nodes]
    notes = [f"torchrun: {args.nnodes} node(s) x {args.gpus_per_node} GPUs; run line i on node i"]
    if args.node_rank is None and args.nnodes > 1 and not args.dry_run:
        raise LaunchError("with --nnodes > 1, run this on every node with --node-rank=<i> (or use --dry-run)")
    return LaunchPlan(kind="torchrun", commands=cmds, notes=notes)


def _slurm_plan(args: argparse.Namespace, config: str) -> LaunchPlan:
    entry = _entry(args, config, launcher="torchrun")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--nproc-per-node",
                str(args.gpus_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT",
                "--rdzv-id", "$SLURM_JOB_ID", *entry]
    # $VARS must expand inside the job, everything else is quoted literally.
    srun_line = " ".join(a if a.startswith("$") else shlex.quote(a) for a in
                         ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", *torchrun])
    srun_line = srun_line.replace("$MASTER_ADDR:$MASTER_PORT", '"$MASTER_ADDR:$MASTER_PORT"')
    sbatch_lines = [f"--job-name={args.job_name}", f"--nodes={args.nnodes}", "--ntasks-per-node=1",
                    f"--gpus-per-node={args.gpus_per_node}", *args.sbatch_arg]
    script = "\n".join([
        "#!/bin/bash",
        *[f"#SBATCH {shlex.quote(x)}" for x in sbatch_lines],
        "set -euo pipefail",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={args.master_port}",
        "export MASTER_ADDR MASTER_PORT",
        srun_line,
        "",
    ])
    stem = os.path.splitext(os.path.basename(config))[0]
    path = os.path.abspath(args.sbatch_out or os.path.join("runs", "launch", f"{stem}.{args.job_name}.sbatch"))
    from megamoe.checkpoint.staged import check_output_path
    check_output_path(path, inputs=[config], what="--sbatch-out", directory=False, error=LaunchError)
    return LaunchPlan(kind="slurm", commands=[["sbatch", path]], sbatch_script=script, sbatch_path=path,
                      notes=[f"slurm: {args.nnodes} node(s) x {args.gpus_per_node} GPUs via sbatch + srun"])


def execute(plan: LaunchPlan) -> int:
    plan.write_files()
    env = {**os.environ, **plan.env}
    for cmd in plan.commands:
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            return rc
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(args)
    except LaunchError as e:
        print(f"megamoe launch: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan.write_files()  # so that the printed commands run as printed
        print(plan.render())
        return 0
    return execute(plan)


def main(argv: list[str] | None = None) -> int:
    """``megamoe launch``: options and CONFIG / key=value may be interleaved."""
    parser = argparse.ArgumentParser(prog="megamoe launch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
