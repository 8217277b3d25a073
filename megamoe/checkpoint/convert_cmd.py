"""``megamoe convert``: megamoe checkpoints to Hugging Face model directories and back.

megamoe -> HF: SOURCE is a consolidated megamoe directory, a DeepSpeed training
checkpoint (any EP size, ZeRO-sharded) or the ``save_pretrained`` directory of a model
upcycled with ``megamoe.integrations.hf.moeify``; OUT becomes an HF directory in
safetensors that ``AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer the
source carries (``--tokenizer`` to give one). HF -> megamoe: SOURCE is an HF Mixtral,
Qwen2-MoE, GLM-4-MoE, DeepSeek-V3 or megamoe-format directory; OUT becomes a consolidated megamoe
directory. Either way the logits are checked on a probe batch before anything is written
(the fp32 max abs diff is printed), and OUT is written atomically. SOURCE is verified against
its checksum manifest first (a damaged file is named); OUT may not be, contain or lie inside
SOURCE, with or without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")
# Mirrors hf_convert.FORMATS / DEFAULT_ATOL without importing torch at parser build time.
FORMATS = ("auto", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3", "megamoe")
DEFAULT_ATOL = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="megamoe checkpoint directory (consolidated or DeepSpeed), a moeified HF "
                                       "model's save_pretrained directory, or an HF model directory with "
                                       "--direction from-hf")
    parser.add_argument("out", help="output directory (created atomically)")
    parser.add_argument("--direction", choices=("auto", "to-hf", "from-hf"), default="auto",
                        help="auto: from-hf when SOURCE has an HF config.json and no megamoe_config.json")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="HF format for to-hf (auto: the first stock class that computes the same function)")
    parser.add_argument("--tag", default=None,
                        help="which checkpoint inside SOURCE: a step_N folder of a run's checkpoints folder, or a "
                             "DeepSpeed tag (default: SOURCE's 'latest' file); refused for a single checkpoint")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of the written HF weights")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help="largest fp32 logits difference accepted by the verification")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists (never allowed when OUT is, contains or lies inside SOURCE)")
    parser.add_argument("--tokenizer", default=None,
                        help="to-hf: sentencepiece .model or directory of HF tokenizer files to write with the model "
                             "(default: the tokenizer SOURCE carries)")


def _direction(source: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    from megamoe.checkpoint.consolidated import CONFIG_NAME
    from megamoe.integrations.hf import is_moeified_dir
    if (source / "config.json").is_file() and not (source / CONFIG_NAME).is_file() and not is_moeified_dir(source):
        return "from-hf"
    return "to-hf"


def run(args: argparse.Namespace) -> int:
    import torch

    from megamoe.checkpoint.hf_convert import convert_from_hf, convert_to_hf

    source = Path(args.source)
    if not source.is_dir():
        print(f"error: source {source} is not a directory", file=sys.stderr)
        return 2
    if not args.atol >= 0:
        print(f"error: --atol={args.atol} is invalid: must be >= 0", file=sys.stderr)
        return 2
    from megamoe.atomic import OutOfSpaceError
    from megamoe.checkpoint.staged import BusyError, check_output_path
    try:
        check_output_path(args.out, inputs=[source], what="OUT")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    direction = _direction(source, args.direction)
    try:
        if direction == "to-hf":
            report = convert_to_hf(source, args.out, format=args.format, tag=args.tag, atol=args.atol,
                                   overwrite=args.overwrite, dtype=getattr(torch, args.dtype), tokenizer=args.tokenizer)
        else:
            if args.format not in ("auto",) or args.tokenizer is not None:
                print("error: --format and --tokenizer apply to --direction to-hf only", file=sys.stderr)
                return 2
            report = convert_from_hf(source, args.out, atol=args.atol, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, BusyError,
            OutOfSpaceError) as exc:  # ConversionError, ConfigError, CheckpointError (a damaged file, named)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
