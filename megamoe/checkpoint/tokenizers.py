"""Tokenizers that travel with checkpoints and exports.

A model is only usable with the tokenizer it was trained with, so every directory megamoe
writes carries it:

- megamoe training checkpoints and consolidated directories hold the sentencepiece model
  as ``tokenizer.model`` next to ``megamoe_config.json``, whose ``"tokenizer"`` entry
  records its sha256 and special tokens (:func:`tokenizer_record`);
- Hugging Face exports hold ``tokenizer.json`` + ``tokenizer_config.json`` (built from the
  sentencepiece model by transformers' own converter, so ``AutoTokenizer.from_pretrained``
  loads it with the ``tokenizers`` library alone) and a copy of ``tokenizer.model``; HF
  tokenizer files already present in a source directory are copied unchanged;
- HF -> megamoe conversion copies them back into the consolidated directory, so
  ``train.init_from`` finds the sentencepiece model and keeps the token ids.

The exported tokenizer encodes exactly as training did (``megamoe.train.data``): no BOS,
no EOS added to a text (training ends each *document* with EOS, which the model learned to
emit, so ``generate`` stops there); unk/bos/eos (and pad, if the model has one) are the
sentencepiece model's own pieces and ids. Decoding matches sentencepiece except for unknown
pieces, which decode as the unk token (``<unk>``) rather than sentencepiece's `` ⁇ ``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from megamoe.config import ConfigError

TOKENIZER_NAME = "tokenizer.model"
# Files a Hugging Face tokenizer may consist of (copied verbatim between HF directories).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "chat_template.jinja", TOKENIZER_NAME)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _specials(sp) -> dict[str, dict[str, Any]]:
    out = {}
    for name, idx in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        if idx >= 0:
            out[name] = {"id": int(idx), "piece": sp.id_to_piece(idx)}
    return out


def tokenizer_record(path: str | os.PathLike) -> dict[str, Any]:
    """The ``"tokenizer"`` entry of ``megamoe_config.json`` for the sentencepiece model at ``path``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return {"file": TOKENIZER_NAME, "kind": "sentencepiece", "sha256": file_sha256(path),
            "pieces": sp.get_piece_size(), "special_tokens": _specials(sp), "adds_bos": False, "adds_eos": False}


def store_tokenizer(spm_path: str | os.PathLike, directory: str | os.PathLike) -> dict[str, Any]:
    """Copy the sentencepiece model into ``directory`` (being filled before an atomic rename)
    and return its record."""
    dst = Path(directory) / TOKENIZER_NAME
    shutil.copyfile(spm_path, dst)
    return tokenizer_record(dst)


def find_tokenizer(directory: str | os.PathLike, meta: dict | None = None) -> Path | None:
    """The sentencepiece model stored in a megamoe directory (None when it has none). When
    ``megamoe_config.json`` recorded one, the file must exist and match its sha256."""
    d = Path(directory)
    path = d / TOKENIZER_NAME
    if meta is None and (d / "megamoe_config.json").is_file():
        with open(d / "megamoe_config.json", encoding="utf-8") as f:
            meta = json.load(f)
    record = (meta or {}).get("tokenizer")
    if isinstance(record, dict) and record.get("sha256"):
        if not path.is_file():
            raise FileNotFoundError(f"{d}/megamoe_config.json records a tokenizer but {path} is missing; copy the "
                                    "sentencepiece model the run trained with there")
        if file_sha256(path) != record["sha256"]:
            raise ValueError(f"{path} is not the tokenizer this checkpoint was trained with (sha256 differs from "
                             f"{d}/megamoe_config.json); restore the original file")
    return path if path.is_file() else None


def has_hf_tokenizer(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "tokenizer.json").is_file() or (Path(directory) / "tokenizer_config.json").is_file()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every tokenizer file of ``src`` into ``dst``; returns the names copied."""
    copied = []
    for name in HF_TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def hf_token_ids(spm_path: str | os.PathLike) -> dict[str, int | None]:
    """bos/eos/pad token ids for an HF model config (and its generation config)."""
    import sentencepiece as spm

    sp = _specials(spm.SentencePieceProcessor(model_file=str(spm_path)))
    return {f"{k}_token_id": sp[k]["id"] if k in sp else None for k in ("bos", "eos", "pad")}


def write_hf_tokenizer(spm_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write ``tokenizer.json`` / ``tokenizer_config.json`` (loadable by ``AutoTokenizer``
    without sentencepiece) and a copy of the sentencepiece model into ``out_dir``."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # unigram, bpe
        raise ConfigError(f"{spm_path}: sentencepiece model type {proto.trainer_spec.model_type} has no "
                          "Hugging Face tokenizer equivalent (only unigram and BPE models do)")
    vocab: Any = ({p.piece: i for i, p in enumerate(proto.pieces)} if proto.trainer_spec.model_type == 2
                  else [(p.piece, p.score) for p in proto.pieces])
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    sp = _specials(spm.SentencePieceProcessor(model_file=str(spm_path)))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{f"{k}_token": v["piece"] for k, v in sp.items()})
    tok.save_pretrained(str(out_dir))
    shutil.copyfile(spm_path, Path(out_dir) / TOKENIZER_NAME)
    return sorted(n for n in HF_TOKENIZER_FILES if (Path(out_dir) / n).is_file())


def check_hf_tokenizer(spm_path: str | os.PathLike, hf_dir: str | os.PathLike, texts: list[str]) -> None:
    """Raise ValueError unless the HF tokenizer in ``hf_dir`` encodes ``texts`` exactly as the
    sentencepiece model does (run before an export is moved into place)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in texts:
        a, b = hf(text, add_special_tokens=True)["input_ids"], sp.encode(text)
        if a != b:
            raise ValueError(f"the exported tokenizer encodes {text[:40]!r} as {a[:12]}..., the sentencepiece model "
                             f"as {b[:12]}...; nothing was written")


__all__ = ["HF_TOKENIZER_FILES", "TOKENIZER_NAME", "check_hf_tokenizer", "copy_tokenizer_files", "file_sha256",
           "find_tokenizer", "has_hf_tokenizer", "hf_token_ids", "store_tokenizer", "tokenizer_record",
           "write_hf_tokenizer"]
