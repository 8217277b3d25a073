"""The ``megamoe`` command line: one subcommand per module listed in COMMANDS.

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int`` and
keeps heavy imports inside ``run`` so ``megamoe --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("megamoe.train.demo", "train a tiny MoE model on synthetic data on the CPU and print its loss"),
    "convert": ("megamoe.checkpoint.convert_cmd", "convert megamoe checkpoints to Hugging Face format and back"),
    "launch": ("megamoe.train.launch", "build (--dry-run: print) deepspeed/torchrun/SLURM multi-node launch commands"),
    "rl": ("megamoe.rl.cli", "train a PMOE mixture-of-experts policy (or unimodal SAC) on a gymnasium task"),
    "train": ("megamoe.train.train_cmd", "train an MoE language model from a YAML config (the main job)"),
    "tokenizer": ("megamoe.train.tokenizer_cmd", "train a sentencepiece tokenizer for data.tokenizer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamoe", description="Mixture-of-Experts training for large models")
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops filling a positional list at the first option, so `train --config C a=1
    # --resume b=2` would leave b=2 unrecognised: key=value words go to the command's overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
