"""``megamoe tokenizer``: train a sentencepiece tokenizer for ``data.tokenizer``.

Either from a training config's data section (``--config CFG [key=value ...]``, which uses
the same documents and held-out split as ``megamoe train``) or from local files
(``--files a.txt b.jsonl``). Writes the ``.model`` file atomically.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--config", help="take documents from this training config's data section")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    p.add_argument("--files", nargs="+", help="local text / JSONL / Parquet files (instead of --config)")
    p.add_argument("--text-field", default="text", help="column holding the text (JSONL, Parquet)")
    from megamoe.config import arg_type
    from megamoe.train.data import MIN_TOKENIZER_VOCAB

    p.add_argument("--vocab-size", type=arg_type(int, ge=MIN_TOKENIZER_VOCAB), default=None,
                   help="pieces (default: model.vocab_size of the config, else 4096)")


def run(args: argparse.Namespace) -> int:
    from megamoe.config import ConfigError

    try:
        from megamoe.config import from_dict
        from megamoe.train.config import DataConfig, apply_overrides, read_yaml
        from megamoe.train.data import load_documents, split_documents, train_tokenizer

        if args.files:
            if args.config or args.overrides:
                raise ConfigError("give either --files or --config, not both")
            data = DataConfig(source="files", files=tuple(args.files), text_field=args.text_field, eval_fraction=0.0)
            missing = [f for f in args.files if not __import__("os").path.isfile(f)]
            if missing:
                raise ConfigError(f"--files: no such file(s): {', '.join(missing)}")
            vocab = args.vocab_size if args.vocab_size is not None else 4096
        else:
            if not args.config:
                raise ConfigError("give --config CFG (its data section) or --files")
            # Only the data section matters here, so a deepspeed-only config works on any machine.
            raw = apply_overrides(read_yaml(args.config), args.overrides)
            data = from_dict(DataConfig, raw.get("data") or {}, where="data")
            if args.vocab_size is not None:
                vocab = args.vocab_size
            else:
                from megamoe.model import ModelConfig
                vocab = from_dict(ModelConfig, raw.get("model") or {}, where="model").vocab_size
        from megamoe.checkpoint.staged import check_output_path
        inputs = list(data.files) + ([data.tokenizer] if data.tokenizer else []) + ([args.config] if args.config else [])
        check_output_path(args.output, inputs=inputs, what="--output", directory=False, error=ConfigError)
        docs = load_documents(data)
        train_docs, _ = split_documents(docs, eval_fraction=data.eval_fraction, seed=data.seed)
        path = train_tokenizer((t for _, t in train_docs), args.output, vocab_size=vocab)
    except ConfigError as exc:
        print(f"megamoe tokenizer: error: {exc}", file=sys.stderr)
        return 2
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    print(f"wrote {path}: {sp.get_piece_size()} pieces from {len(train_docs)} documents")
    return 0
