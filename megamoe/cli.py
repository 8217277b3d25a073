"""The ``megamoe`` command line: one subcommand per module listed in COMMANDS.

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int`` and
keeps heavy imports inside ``run`` so ``megamoe --help`` stays fast.
:func:`command_line` renders a megamoe command the way the project prints it for the user
to run next (the train job's export hint, the quickstart), runnable from a fresh shell.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("megamoe.train.demo", "train a tiny MoE model on synthetic data on the CPU and print its loss"),
    "convert": ("megamoe.checkpoint.convert_cmd", "convert megamoe checkpoints to Hugging Face format and back"),
    "launch": ("megamoe.train.launch", "build (--dry-run: print) deepspeed/torchrun/SLURM multi-node launch commands"),
    "rl": ("megamoe.research.rl.cli", "train a PMOE mixture-of-experts policy (or unimodal SAC) on a gymnasium task"),
    "train": ("megamoe.train.train_cmd", "train an MoE language model from a YAML config (the main job)"),
    "tokenizer": ("megamoe.train.tokenizer_cmd", "train a sentencepiece tokenizer for data.tokenizer"),
}


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full)
    return rel if not rel.startswith(os.pardir) else full


def command_line(*args: str, script: str = "megamoe", module: str = "megamoe.cli") -> str:
    """``megamoe ARGS...`` (or another console ``script`` of this environment) as a shell line
    that works without an activated environment: the script beside this interpreter
    (``python -m MODULE`` when there is none). Absolute paths below the working directory are
    shown relative to it."""
    path = os.path.join(os.path.dirname(sys.executable), script)
    head = [_shown_path(path)] if os.access(path, os.X_OK) else [_shown_path(sys.executable), "-m", module]
    shown = [_shown_path(a) if os.path.isabs(a) else a for a in args]
    return shlex.join([*head, *shown])


def _version() -> str:
    from megamoe import __version__
    return f"megamoe {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamoe", description="Mixture-of-Experts training for large models")
    parser.add_argument("--version", action="version", version=_version())
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        # Its CONFIG and key=value overrides may sit between options, which a subparser cannot
        # parse; its own parser can (same arguments, same help).
        from megamoe.train import launch
        return launch.main(argv[1:])
    parser = build_parser()
    # argparse stops filling a positional list at the first option, so `train --config C a=1
    # --resume b=2` would leave b=2 unrecognised: key=value words go to the command's overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from megamoe.config import ConfigError
    try:
        return int(args._module.run(args) or 0)
    except ConfigError as exc:  # bad user input, whichever command met it: the message, not a traceback
        print(f"megamoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
