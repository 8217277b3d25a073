"""``megamoe train --config CFG [key=value ...] [--resume [CKPT]]``: the main training job.

Run it directly (one process), or under torchrun / the deepspeed launcher (launch/), which
set RANK / WORLD_SIZE; the config is checked against the world size before any process
group starts. Ends by printing where the metrics, plots and checkpoint are. Exit status: 0
done, 2 a config error, 1 training went non-finite (``train.nonfinite: error``).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (sections model, data, train, parallel, deepspeed, balancing)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.steps=50 model.moe.router.top_k=1 parallel.backend=torch")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="resume from the newest checkpoint in train.output_dir (or from CKPT); starts fresh "
                        "when there is none. Overrides may change only the settings listed in "
                        "megamoe.train.config.RESUME_CHANGEABLE (steps, lr and schedule, intervals, batch layout, "
                        "...); any other difference from the checkpoint's config is refused by name")
    p.add_argument("--overwrite", action="store_true",
                   help="without --resume: delete an earlier run's checkpoints and logs in train.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import os

    from megamoe.cli import command_line
    from megamoe.config import ConfigError
    from megamoe.train.config import check_world_size, dump_config, load_config, world_size_from_env

    if args.resume not in (None, "latest") and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value ...`: argparse took the first override as the checkpoint path.
        args.overrides, args.resume = [args.resume, *args.overrides], "latest"
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:  # printing needs no world: the layout is checked where the job starts
            print(dump_config(cfg), end="")
            return 0
        check_world_size(cfg, world_size_from_env())
    except ConfigError as exc:
        print(f"megamoe train: config error: {exc}", file=sys.stderr)
        return 2

    from megamoe.atomic import OutOfSpaceError
    from megamoe.checkpoint.integrity import CheckpointError, NonFiniteWeightsError
    from megamoe.checkpoint.staged import BusyError
    from megamoe.finite import NonFiniteError
    from megamoe.train.trainer import run_training
    try:
        result = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"megamoe train: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError, NonFiniteWeightsError, OutOfSpaceError, BusyError) as exc:
        # Training went non-finite, a damaged checkpoint or cache file (named), weights gone non-finite,
        # a full disk, a second writer.
        print(f"megamoe train: error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result.final_eval
        print(f"\ntraining done: {result.final_step} steps"
              + (f"; held-out loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, MaxVio_global {ev['max_vio_global']:.3f}"
                 if ev else ""))
        print(f"  metrics:     {os.path.join(result.output_dir, 'metrics.jsonl')}")
        tb = command_line("--logdir", os.path.join(result.output_dir, "tb"), script="tensorboard",
                          module="tensorboard.main")
        print(f"  tensorboard: {tb}")
        for path in result.plots:
            print(f"  plot:        {path}")
        if result.nonfinite_steps_skipped:
            print(f"  skipped:     {result.nonfinite_steps_skipped} non-finite steps (train.nonfinite=skip)")
        print(f"  checkpoint:  {result.checkpoint}")
        print(f"  export to HF: {command_line('convert', result.checkpoint, os.path.join(result.output_dir, 'hf'))}")
    return 0
