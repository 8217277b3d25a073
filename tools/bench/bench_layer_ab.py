"""Compare megamoe's MoE layer between two versions of this repository, side by side.

    python tools/bench/bench_layer_ab.py --base v0.1   # this checkout against git revision v0.1

On a machine whose speed drifts (a shared VM), timings taken one after the other compare the
drift as much as the code. This script runs the two versions at the same time instead, one
process per CPU core, and swaps the cores between rounds: forward+backward of one dropless
top-k layer (the shapes of bench_layer.py), fp32, one thread, this process's CPU time, median
of --repeats steps after 2 warm-ups. It needs 2 cores. The base revision is checked out into
a temporary git worktree (removed afterwards); both versions run with this environment's
packages. Prints one line per round and the median of the rounds' medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench_layer import SHAPES as LAYER_SHAPES  # this folder is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {name: LAYER_SHAPES[name] for name in ("coarse", "fine")}  # the CPU shapes

# Runs inside each version's tree (PYTHONPATH points at it): the layer's public API only.
STEP = r"""
import os, statistics, sys, time, torch
os.sched_setaffinity(0, {int(sys.argv[1])})
torch.set_num_threads(1)
import megamoe
from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig
assert os.path.realpath(megamoe.__file__).startswith(os.path.realpath(os.getcwd())), megamoe.__file__
T, H, I, E, K = map(int, sys.argv[2].split(","))
torch.manual_seed(0)
layer = MoELayer(MoEConfig(hidden_size=H, num_experts=E, experts=ExpertConfig(intermediate_size=I),
                           router=RouterConfig(top_k=K, aux_loss_coef=0.01)))
x, upstream = torch.randn(1, T, H), torch.randn(1, T, H)
def step():
    xi = x.detach().requires_grad_(True)
    out = layer(xi)
    (out[0] if isinstance(out, tuple) else out).backward(upstream)
for _ in range(2):
    step()
times = []
for _ in range(int(sys.argv[3])):
    layer.zero_grad(set_to_none=True)
    t0 = time.process_time()
    step()
    times.append((time.process_time() - t0) * 1000)
print(statistics.median(times))
"""


def _run_pair(trees: dict[str, str], shape: str, repeats: int, swap: bool) -> dict[str, float]:
    dims = ",".join(map(str, SHAPES[shape]))
    procs = {}
    for core, (name, tree) in enumerate(sorted(trees.items(), reverse=swap)):
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen([sys.executable, "-c", STEP, str(core), dims, str(repeats)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tree)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the {name} version failed:\n{stderr[-2000:]}")
        out[name] = float(stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare this checkout against")
    p.add_argument("--shapes", default="fine,coarse", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=3, help="rounds per shape (cores swapped each round)")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per process")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    if len(os.sched_getaffinity(0)) < 2:
        p.error("needs 2 CPU cores (one per version)")
    with tempfile.TemporaryDirectory(prefix="megamoe-ab-") as tmp:
        base_tree = os.path.join(tmp, "base")
        try:
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", base_tree, args.base], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            p.error(f"--base {args.base}: git could not check it out: {exc.stderr.strip()}")
        try:
            trees = {"base": base_tree, "this": ROOT}
            for shape in shapes:
                rounds = []
                for r in range(args.rounds):
                    res = _run_pair(trees, shape, args.repeats, swap=bool(r % 2))
                    rounds.append(res)
                    print(f"{shape} round {r + 1}: base {res['base']:.1f} ms, this {res['this']:.1f} ms", flush=True)
                base = statistics.median(r["base"] for r in rounds)
                this = statistics.median(r["this"] for r in rounds)
                print(f"{shape}: median base {base:.1f} ms, this {this:.1f} ms, this/base {this / base:.2f}", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
