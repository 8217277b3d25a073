"""Experiment: PMOE (K=4) vs unimodal SAC (K=1) on Pendulum-v1 or MuJoCo tasks, several seeds, equal env steps.

Both arms use the same trainer (megamoe.research.rl.sac) and hyper-parameters; only ``components``
differs. Writes <out>/<name>.md (table per env) and <name>.png (mean +- std of the training
return vs steps over seeds), plus <name>.jsonl (every episode); ``--out`` defaults to
runs/exp_pmoe (the published tables were made with ``--out tools/results``).

    OMP_NUM_THREADS=1 python tools/experiments/exp_pmoe.py --steps 6000 --seeds 3
    OMP_NUM_THREADS=1 python tools/experiments/exp_pmoe.py --env HalfCheetah-v5 Hopper-v5 \\
        --preset standard --steps 20000 --seeds 2 --name pmoe_mujoco    # needs pip install -e '.[mujoco]'

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
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from megamoe.research.rl import SACConfig, evaluate, make_agent, make_env, train

    env, eval_env = make_env(job["env"]), make_env(job["env"])
    cfg = SACConfig(**job["sac"])
    torch.manual_seed(job["seed"])
    agent = make_agent(env, cfg)
    cpu0, wall0 = time.process_time(), time.time()
    records = train(env, agent, total_steps=job["steps"], seed=job["seed"])
    final_eval = evaluate(eval_env, agent, episodes=10, seed=50_000 + job["seed"] * 100)
    return {"env": job["env"], "components": cfg.components, "seed": job["seed"], "cpu_s": time.process_time() - cpu0,
            "wall_s": time.time() - wall0, "final_eval": final_eval,
            "episodes": [r.to_json() for r in records]}


# "small": the Pendulum settings; "standard": the SAC paper's MuJoCo settings (Haarnoja et al. 2018), with
# fewer random warm-up steps because the runs here are short.
PRESETS = {
    "small": dict(hidden=(64, 64), batch_size=128, actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3,
                  start_steps=1000, update_after=1000),
    "standard": dict(hidden=(256, 256), batch_size=256, actor_lr=3e-4, critic_lr=3e-4, alpha_lr=3e-4,
                     start_steps=5000, update_after=1000),
}
PAPER_CLAIM = ("Paper claim (Ren et al. 2021): PMOE beats unimodal SAC/PPO policies (and other MoE policies) on six "
               "MuJoCo tasks, trained for 1M environment steps (several seeds).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", nargs="+", default=["Pendulum-v1"], help="one or more gymnasium ids, run in order")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--components", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="small: (64, 64) MLPs, lr 1e-3 (Pendulum); standard: SAC-paper (256, 256), lr 3e-4")
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each)")
    ap.add_argument("--out", type=Path, default=Path("runs") / "exp_pmoe",
                    help="output folder (default runs/exp_pmoe; the results in the README: tools/results)")
    ap.add_argument("--name", default="pmoe", help="output file stem: <name>.md, <name>.png, <name>.jsonl")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild <name>.md and <name>.png from <name>.jsonl (e.g. of a sweep stopped early)")
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1 or min(args.components) < 1:
        ap.error("--steps, --seeds, --jobs and --components must be positive")
    from megamoe.research.rl import EnvError, make_env

    for env_id in [] if args.report_only else args.env:  # fail before any run starts
        try:
            make_env(env_id).close()
        except EnvError as exc:
            ap.error(str(exc))

    sac = PRESETS[args.preset]
    if args.report_only:
        results = [json.loads(line) for line in (args.out / f"{args.name}.jsonl").read_text().splitlines()]
        _report(results, args, sac, time.time(), len(args.env) * args.seeds * len(args.components))
        print((args.out / f"{args.name}.md").read_text())
        return 0
    jobs = [{"env": e, "steps": args.steps, "seed": s, "sac": {**sac, "components": k}}
            for s in range(args.seeds) for e in args.env for k in args.components]  # seed-major: a cut-short sweep covers every env
    t0 = time.time()
    results: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.jobs == 1:  # results and report are rewritten after every run, so a cut-short sweep still reports
        for j in jobs:
            results.append(run_one(j))
            r = results[-1]
            print(f"{r['env']} K={r['components']} seed={r['seed']}: eval {np.mean(r['final_eval']):.1f} "
                  f"cpu {r['cpu_s']:.0f}s", flush=True)
            _report(results, args, sac, t0, len(jobs))
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_one, jobs)
        _report(results, args, sac, t0, len(jobs))
    print((args.out / f"{args.name}.md").read_text())
    return 0


def _report(results: list[dict], args: argparse.Namespace, sac: dict, t0: float, n_jobs: int) -> None:
    from megamoe.research.rl.artifacts import atomic_write_text

    atomic_write_text(args.out / f"{args.name}.jsonl", "".join(json.dumps(r) + "\n" for r in results))

    def ms(xs: list[float]) -> str:
        return f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"

    envs = [e for e in args.env if any(r["env"] == e for r in results)]
    name = {1: "SAC, unimodal (K=1)"}
    lines = [f"# PMOE vs unimodal SAC on {', '.join(envs)}", "",
             f"Up to {args.seeds} seeds x {args.steps} env steps per arm (1 gradient update per step after "
             f"{sac['update_after']} steps, uniform random actions for the first {sac['start_steps']}); MLPs "
             f"{sac['hidden']}, batch {sac['batch_size']}, lr {sac['actor_lr']}, auto-tuned entropy. Higher is "
             f"better. Command: `python tools/experiments/exp_pmoe.py --env {' '.join(args.env)} --steps {args.steps} "
             f"--seeds {args.seeds} --preset {args.preset} --jobs {args.jobs} --name {args.name}`.", ""]
    for env_id in envs:
        lines += [f"## {env_id}", "",
                  "| policy | seeds | final eval return (10 ep, deterministic) | last-5 training return | AUC (mean "
                  "training return) | per-seed final eval | CPU s |", "|---|---|---|---|---|---|---|"]
        for k in args.components:
            rs = [r for r in results if r["components"] == k and r["env"] == env_id]
            if not rs:
                continue
            ev = [float(np.mean(r["final_eval"])) for r in rs]
            tr = [[e["return"] for e in r["episodes"] if e["kind"] == "train"] for r in rs]
            last = [float(np.mean(t[-5:])) for t in tr]
            auc = [float(np.mean(t)) for t in tr]
            lines.append(f"| {name.get(k, f'PMOE (K={k})')} | {len(rs)} | {ms(ev)} | {ms(last)} | {ms(auc)} | "
                         f"{', '.join(f'{x:.0f}' for x in ev)} | {sum(r['cpu_s'] for r in rs):.0f} |")
        lines.append("")
    total_cpu = sum(r["cpu_s"] for r in results)
    lines += [f"{len(results)}/{n_jobs} runs done; total CPU {total_cpu:.0f} s "
              f"({sum(r['wall_s'] for r in results):.0f} s wall in the runs, {args.jobs} worker(s)).", "",
              PAPER_CLAIM + f" This run: {args.steps} steps ({args.steps / 1e6:.0%} of that), with the seeds counted "
              f"in each table.", ""]
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(lines))
    _plot(results, args, envs, args.out / f"{args.name}.png")


def _plot(results: list[dict], args: argparse.Namespace, envs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megamoe.atomic import atomic_savefig

    fig, axes = plt.subplots(1, len(envs), figsize=(6.4 * len(envs), 4.0), dpi=90, squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for k in args.components:
            curves = [_binned(r["episodes"], args.steps) for r in results if r["components"] == k and r["env"] == env_id]
            if not curves:
                continue
            steps = curves[0][0]
            rets = np.array([c[1] for c in curves])
            with warnings.catch_warnings():  # windows before the first episode end are all-NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(rets, 0), np.nanstd(rets, 0)
            label = "SAC (K=1)" if k == 1 else f"PMOE (K={k})"
            ax.plot(steps, mean, label=f"{label}, {len(curves)} seeds")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
        ax.set_title(f"{env_id}: PMOE vs unimodal SAC (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, format="png")
    finally:
        plt.close(fig)


def _binned(episodes: list[dict], total_steps: int, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Mean training return of the episodes ending in each of ``bins`` equal step windows (carried forward
    through windows where none ended), so runs with different episode lengths share one x axis."""
    edges = np.linspace(0, total_steps, bins + 1)
    train = [(e["step"], e["return"]) for e in episodes if e["kind"] == "train"]
    out, last = np.full(bins, np.nan), np.nan
    for i in range(bins):
        rets = [r for s, r in train if edges[i] < s <= edges[i + 1]]
        last = float(np.mean(rets)) if rets else last
        out[i] = last
    return edges[1:], out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
