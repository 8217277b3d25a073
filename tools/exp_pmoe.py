"""Experiment: PMOE (K=4) vs unimodal SAC (K=1) on Pendulum-v1, several seeds, equal env steps.

Both arms use the same trainer (megamoe.rl.sac) and hyper-parameters; only ``components``
differs. Writes tools/results/pmoe.md (table) and tools/results/pmoe.png (mean +- std of the
training return vs steps over seeds), plus tools/results/pmoe.jsonl (every episode).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/exp_pmoe.py --steps 6000 --seeds 3

Reported per arm (mean +- std over seeds): the final deterministic evaluation return (10
episodes), the mean training return over the last 5 episodes, and the area under the
training-return curve (mean over all episodes; the paper's headline metric is an AUC).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from megamoe.rl import SACConfig, evaluate, make_agent, make_env, train

    env, eval_env = make_env(job["env"]), make_env(job["env"])
    cfg = SACConfig(**job["sac"])
    torch.manual_seed(job["seed"])
    agent = make_agent(env, cfg)
    cpu0, wall0 = time.process_time(), time.time()
    records = train(env, agent, total_steps=job["steps"], seed=job["seed"])
    final_eval = evaluate(eval_env, agent, episodes=10, seed=50_000 + job["seed"] * 100)
    return {"components": cfg.components, "seed": job["seed"], "cpu_s": time.process_time() - cpu0,
            "wall_s": time.time() - wall0, "final_eval": final_eval,
            "episodes": [r.to_json() for r in records]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="Pendulum-v1")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--components", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1 or min(args.components) < 1:
        ap.error("--steps, --seeds, --jobs and --components must be positive")

    sac = dict(hidden=(64, 64), batch_size=128, actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3,
               start_steps=1000, update_after=1000)
    jobs = [{"env": args.env, "steps": args.steps, "seed": s, "sac": {**sac, "components": k}}
            for s in range(args.seeds) for k in args.components]
    t0 = time.time()
    if args.jobs == 1:
        results = []
        for j in jobs:
            results.append(run_one(j))
            r = results[-1]
            print(f"K={r['components']} seed={r['seed']}: eval {np.mean(r['final_eval']):.1f} "
                  f"cpu {r['cpu_s']:.0f}s", flush=True)
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_one, jobs)
    total_cpu = sum(r["cpu_s"] for r in results)

    from megamoe.rl.artifacts import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "pmoe.jsonl", "".join(json.dumps(r) + "\n" for r in results))

    rows = []
    for k in args.components:
        rs = [r for r in results if r["components"] == k]
        ev = [float(np.mean(r["final_eval"])) for r in rs]
        last = [float(np.mean([e["return"] for e in r["episodes"] if e["kind"] == "train"][-5:])) for r in rs]
        auc = [float(np.mean([e["return"] for e in r["episodes"] if e["kind"] == "train"])) for r in rs]
        rows.append((k, ev, last, auc, sum(r["cpu_s"] for r in rs)))

    def ms(xs: list[float]) -> str:
        return f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"

    name = {1: "SAC, unimodal (K=1)"}
    lines = [f"# PMOE vs unimodal SAC on {args.env}", "",
             f"{args.seeds} seeds x {args.steps} env steps per arm (1 gradient update per step after "
             f"{sac['update_after']} random steps); MLPs {sac['hidden']}, batch {sac['batch_size']}, "
             f"lr {sac['actor_lr']}, auto-tuned entropy. Higher is better (Pendulum returns are <= 0).", "",
             "| policy | final eval return (10 ep, deterministic) | last-5 training return | AUC (mean training "
             "return) | per-seed final eval | CPU s |", "|---|---|---|---|---|---|"]
    for k, ev, last, auc, cpu in rows:
        lines.append(f"| {name.get(k, f'PMOE (K={k})')} | {ms(ev)} | {ms(last)} | {ms(auc)} | "
                     f"{', '.join(f'{x:.0f}' for x in ev)} | {cpu:.0f} |")
    lines += ["", f"Total CPU {total_cpu:.0f} s ({time.time() - t0:.0f} s wall, {args.jobs} worker(s)).", "",
              "Paper claim (Ren et al. 2021): PMOE beats unimodal SAC/PPO policies (and other MoE policies) on six "
              "MuJoCo tasks. This run is a small-budget check on Pendulum-v1 (no MuJoCo on this machine), not a "
              "reproduction of that claim.", ""]
    atomic_write_text(args.out / "pmoe.md", "\n".join(lines))
    _plot(results, args, args.out / "pmoe.png")
    print("\n".join(lines))
    return 0


def _plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megamoe.atomic import atomic_savefig

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for k in args.components:
        curves = [[(e["step"], e["return"]) for e in r["episodes"] if e["kind"] == "train"]
                  for r in results if r["components"] == k]
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        rets = np.array([[ret for _, ret in c[:n]] for c in curves])
        mean, std = rets.mean(0), rets.std(0)
        label = "SAC (K=1)" if k == 1 else f"PMOE (K={k})"
        ax.plot(steps, mean, label=f"{label}, {len(curves)} seeds")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("training episode return")
    ax.set_title(f"{args.env}: PMOE vs unimodal SAC (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, format="png")
    finally:
        plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
