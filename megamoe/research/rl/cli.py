"""``megamoe rl``: train a PMOE (mixture-of-Gaussians) or unimodal (``--components 1``) SAC agent.

Writes into ``--out`` (default ``runs/rl/<env>-k<K>-s<seed>-<time>``): ``config.json``,
``returns.jsonl`` (one JSON object per training or eval episode), ``returns.png`` (return vs
steps), ``checkpoint.pt`` (agent, optimizers; load with ``SACAgent.from_checkpoint``) and
``resume.pt`` (the whole training state at the first episode end after every
``--checkpoint-every`` steps, and when the run stops, at its last episode end), all written
atomically. A tqdm progress bar shows the steps and
the latest return. ``--resume --out DIR`` continues a run from its ``resume.pt`` with the
settings saved in its ``config.json`` (``--steps`` may raise the total).

The two ``.pt`` files are single files replaced atomically, so no manifest: ``--resume``
checks ``resume.pt``'s zip CRCs (torch stores one per record) before loading it and names a
damaged file; weights holding NaN or inf are never written (the run stops with an error).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from megamoe.config import arg_type

_positive_int = arg_type(int, ge=1)
_non_negative_int = arg_type(int, ge=0)
_positive_float = arg_type(float, gt=0)
_unit_float = arg_type(float, ge=0, le=1)


def _hidden(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive layer sizes like '256,256', got {text!r}")
    return tuple(int(p) for p in parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="Pendulum-v1",
                   help="gymnasium id with continuous actions (default Pendulum-v1; MuJoCo ids such as "
                        "HalfCheetah-v5 need `pip install mujoco`; megamoe/BimodalBandit-v0 is the bandit)")
    p.add_argument("--components", type=_positive_int, default=4,
                   help="mixture components K of the PMOE policy; 1 = unimodal SAC (default 4)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="environment steps (default 20000; with --resume, the run's saved total)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/rl/<env>-k<K>-s<seed>-<time>); must not hold a run")
    p.add_argument("--hidden", type=_hidden, default=(256, 256), help="MLP sizes, e.g. 256,256 (default)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--lr", type=_positive_float, default=3e-4, help="actor, critic and temperature learning rate")
    p.add_argument("--gamma", type=_unit_float, default=0.99, help="discount (default 0.99)")
    p.add_argument("--tau", type=arg_type(float, gt=0, le=1), default=0.005, help="target-network averaging rate (default 0.005)")
    p.add_argument("--alpha", type=_positive_float, default=0.2, help="initial entropy temperature (default 0.2)")
    p.add_argument("--fixed-alpha", action="store_true", help="keep the temperature fixed at --alpha")
    p.add_argument("--start-steps", type=_non_negative_int, default=1000,
                   help="uniformly random actions before the policy acts (default 1000)")
    p.add_argument("--update-after", type=_non_negative_int, default=1000,
                   help="env steps before gradient updates begin (default 1000)")
    p.add_argument("--buffer-size", type=_positive_int, default=1_000_000)
    p.add_argument("--eval-every", type=_non_negative_int, default=5000,
                   help="deterministic evaluation every N steps, 0 = never (default 5000)")
    p.add_argument("--eval-episodes", type=_positive_int, default=5)
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=5000,
                   help="write checkpoint.pt every N steps (always at the end), and resume.pt at the first "
                        "episode end after every N steps (and, when the run stops, at its last episode end); "
                        "0 = only at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its resume.pt, with the settings in its config.json; "
                        "other options must be left out or match them (--steps may be raised)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; small MLPs are fastest there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(msg: str) -> int:
    print(f"megamoe rl: error: {msg}", file=sys.stderr)
    return 2


DEFAULT_STEPS = 20_000
# CLI option -> how to read its value from a run's config.json (for --resume).
_SAVED = {
    "env": lambda c: c["env"], "seed": lambda c: c["seed"], "components": lambda c: c["sac"]["components"],
    "hidden": lambda c: tuple(c["sac"]["hidden"]), "batch_size": lambda c: c["sac"]["batch_size"],
    "lr": lambda c: c["sac"]["actor_lr"], "gamma": lambda c: c["sac"]["gamma"], "tau": lambda c: c["sac"]["tau"],
    "alpha": lambda c: c["sac"]["init_alpha"], "fixed_alpha": lambda c: not c["sac"]["autotune_alpha"],
    "start_steps": lambda c: c["sac"]["start_steps"], "update_after": lambda c: c["sac"]["update_after"],
    "buffer_size": lambda c: c["sac"]["buffer_size"], "eval_every": lambda c: c["eval_every"],
    "eval_episodes": lambda c: c["eval_episodes"], "checkpoint_every": lambda c: c["checkpoint_every"],
}


def _apply_saved_settings(args: argparse.Namespace, saved: dict) -> str | None:
    """For --resume: take every run-defining option from the saved config; an option given with a
    non-default value that differs from the saved one is an error (returned as its message)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    missing = [k for k in ("eval_every", "eval_episodes", "checkpoint_every") if k not in saved]
    if missing:
        return f"{args.out}/config.json lacks {missing}; it was written by an older megamoe and cannot be resumed"
    for name, read in _SAVED.items():
        value, saved_value = getattr(args, name), read(saved)
        if value != defaults.get_default(name) and value != saved_value:
            flag = "--" + name.replace("_", "-")
            return (f"{flag} {value!r} differs from the resumed run's {saved_value!r}; --resume keeps the run's "
                    f"settings, so leave {flag} out")
        setattr(args, name, saved_value)
    if args.steps is None:
        args.steps = saved["steps"]
    return None


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from megamoe.config import ConfigError
    from megamoe.research.rl.artifacts import atomic_torch_save, atomic_write_text, plot_returns, write_jsonl
    from megamoe.research.rl.envs import EnvError, make_env
    from megamoe.research.rl.sac import SACConfig, make_agent, train

    import json

    resume_state = None
    if args.resume:
        if args.out is None:
            return _error("--resume needs --out DIR, the directory of the run to continue")
        if not (args.out / "resume.pt").is_file() or not (args.out / "config.json").is_file():
            return _error(f"--out {str(args.out)!r} holds no resumable run (config.json and resume.pt; resume.pt "
                          f"is written at episode ends and when a run stops)")
        from megamoe.checkpoint.integrity import CheckpointError, check_torch_file, read_json, torch_load
        advice = (f"the run in {args.out} cannot continue from it: start a new run with another --out, or restore "
                  "the file from a copy")
        try:
            saved = read_json(args.out / "config.json", advice=advice)
            if not isinstance(saved, dict):
                raise CheckpointError(args.out / "config.json", "is not a JSON object", advice)
            msg = _apply_saved_settings(args, saved)
            if msg:
                return _error(msg)
            check_torch_file(args.out / "resume.pt", advice=advice)
            resume_state = torch_load(args.out / "resume.pt", map_location="cpu", weights_only=False, advice=advice)
            if not isinstance(resume_state, dict) or not {"step", "buffer", "records"} <= resume_state.keys():
                raise CheckpointError(args.out / "resume.pt", "is not a megamoe rl resume state (step, buffer, "
                                                              "records)", advice)
        except CheckpointError as exc:
            return _error(str(exc))
        if args.steps < resume_state["step"]:
            return _error(f"--steps {args.steps} is below the resumed run's step {resume_state['step']}")
        buf = resume_state["buffer"]
        if buf["added"] > buf["capacity"] and min(args.buffer_size, args.steps) != buf["capacity"]:
            return _error(f"--steps {args.steps} would change the size of the run's full replay buffer "
                          f"({buf['capacity']}); resume with --steps >= --buffer-size or with the saved --steps")
    elif args.steps is None:
        args.steps = DEFAULT_STEPS
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return _error(f"--device {args.device!r} is not a torch device (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    try:
        env, eval_env = make_env(args.env), make_env(args.env)
    except EnvError as exc:
        return _error(str(exc))
    try:
        cfg = SACConfig(components=args.components, hidden=args.hidden, actor_lr=args.lr, critic_lr=args.lr,
                        alpha_lr=args.lr, gamma=args.gamma, tau=args.tau, batch_size=args.batch_size,
                        buffer_size=args.buffer_size, start_steps=args.start_steps, update_after=args.update_after,
                        init_alpha=args.alpha, autotune_alpha=not args.fixed_alpha)
        torch.manual_seed(args.seed)  # the initial networks depend on --seed only, so runs are reproducible
        agent = make_agent(env, cfg, device=device)
    except (ConfigError, ValueError) as exc:
        return _error(str(exc))

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.env)
    out = args.out or Path("runs") / "rl" / f"{slug}-k{args.components}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    from megamoe.checkpoint.staged import check_output_path
    try:
        check_output_path(out, what="--out")
    except ValueError as exc:
        return _error(str(exc))
    if resume_state is None and any((out / f).exists() for f in ("returns.jsonl", "checkpoint.pt", "resume.pt")):
        return _error(f"--out {str(out)!r} already holds a run; pick a new directory (or continue it with --resume)")
    out.mkdir(parents=True, exist_ok=True)

    run_info = {"env": args.env, "seed": args.seed, "steps": args.steps, "device": str(device),
                "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
                "checkpoint_every": args.checkpoint_every, "sac": cfg.to_dict()}
    atomic_write_text(out / "config.json", json.dumps(run_info, indent=2) + "\n")
    title = f"{args.env}: {'PMOE K=' + str(cfg.components) if cfg.components > 1 else 'SAC (K=1)'}, seed {args.seed}"

    records: list = []
    first = 0
    if resume_state is not None:
        from megamoe.research.rl.sac import EpisodeRecord

        records = [EpisodeRecord(**r) for r in resume_state["records"]]
        first = resume_state["step"]
        write_jsonl(out / "returns.jsonl", (r.to_json() for r in records))  # drop what comes after the resume point
        print(f"megamoe rl: resuming {out} at step {first} of {args.steps}", file=sys.stderr)
    bar = tqdm(total=args.steps, initial=first, unit="step", desc=f"rl {args.env} K={cfg.components}",
               disable=args.no_progress, mininterval=0.5, dynamic_ncols=True)

    from megamoe.atomic import OutOfSpaceError
    from megamoe.checkpoint.integrity import NonFiniteWeightsError, check_finite

    def save_finite(state: dict, path: Path) -> None:
        check_finite(agent.state_dict().items(), what=str(path))  # the networks went NaN: keep the last good file
        atomic_torch_save(state, path)

    def save_checkpoint(step: int) -> None:
        save_finite(agent.checkpoint(step=step, env=args.env, seed=args.seed), out / "checkpoint.pt")
        plot_returns(out / "returns.png", records, title=title)

    def on_episode(rec) -> None:
        records.append(rec)
        write_jsonl(out / "returns.jsonl", (r.to_json() for r in records))
        bar.set_postfix({"eval" if rec.kind == "eval" else "return": f"{rec.ret:.1f}"}, refresh=False)

    def on_step(step: int) -> None:
        bar.update(1)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step != args.steps:
            save_checkpoint(step)

    start = time.time()
    try:
        train(env, agent, total_steps=args.steps, seed=args.seed, eval_env=eval_env, eval_every=args.eval_every,
              eval_episodes=args.eval_episodes, on_episode=on_episode, on_step=on_step,
              checkpoint_every=args.checkpoint_every,
              on_checkpoint=lambda state: save_finite(state, out / "resume.pt"), resume=resume_state)
        if first < args.steps or not (out / "checkpoint.pt").exists():
            save_checkpoint(args.steps)
    except (NonFiniteWeightsError, OutOfSpaceError) as exc:
        return _error(str(exc))
    finally:
        bar.close()
    write_jsonl(out / "returns.jsonl", (r.to_json() for r in records))
    train_rets = [r.ret for r in records if r.kind == "train"]
    last = train_rets[-10:]
    summary = f"mean return of last {len(last)} episodes {sum(last) / len(last):.1f}" if last else "no episode finished"
    print(f"megamoe rl: {args.steps - first} steps in {time.time() - start:.0f}s, {len(train_rets)} episodes, {summary}; "
          f"outputs in {out}")
    env.close()
    eval_env.close()
    return 0
