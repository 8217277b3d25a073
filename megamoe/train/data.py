"""The data pipeline: documents -> sentencepiece tokens -> packed fixed-length sequences.

Shape legend: N packed sequences, S sequence length (``data.seq_len``), G global batch,
B micro batch per process.

1. Documents come from the embedded corpus (megamoe.train.corpus), local text / JSONL /
   Parquet files (read here, so a bad file is a ConfigError naming it and the line or row:
   not UTF-8, NUL bytes, malformed JSON, a text field holding a list or number, an unreadable
   Parquet file, no documents), or a hub dataset through ``datasets``. Each document has a
   domain label (the embedded domain, or the file's name).
2. A deterministic, seeded split holds out ``eval_fraction`` of the documents.
3. A sentencepiece model (trained on the training split, or loaded) tokenises them; each
   document ends with EOS and the stream is cut into sequences of S tokens (packing).
4. :func:`prepare_data` caches tokenizer and token arrays under a key derived from the data
   config, written atomically and sealed by a checksum manifest (megamoe.checkpoint.staged),
   so ranks and reruns reuse them, and a damaged cache is named rather than trained on.
5. :class:`ShuffledBatches` maps an optimizer step to the global batch's sequence indices
   without any state: epoch e is a permutation seeded by (seed, e), so resuming at step s
   reads exactly the batches an uninterrupted run would, at any world size.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from megamoe.atomic import atomic_write
from megamoe.config import ConfigError, to_dict
from megamoe.train.config import DataConfig

_EXT_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                ".parquet": "parquet"}
CACHE_VERSION = 2  # 2: local files read by megamoe (1: through datasets)
MIN_TOKENIZER_VOCAB = 32  # sentencepiece needs room for its special and byte pieces


# ----------------------------------------------------------------------------- documents
def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXT_FORMATS:
        raise ConfigError(f"data.files: cannot tell the format of {path!r} from its extension; use one of "
                          f"{', '.join(sorted(_EXT_FORMATS))} or set data.format to text, json or parquet")
    return _EXT_FORMATS[ext]


def load_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(domain, text) pairs in a fixed order; empty documents are skipped."""
    if cfg.source == "embedded":
        from megamoe.train.corpus import generate_corpus
        docs = generate_corpus(cfg.embedded_docs, seed=cfg.seed)
    elif cfg.source == "files":
        docs = []
        for path in cfg.files:
            domain = os.path.splitext(os.path.basename(path))[0]
            docs.extend((domain, t) for t in _load_file_texts(path, file_format(path, cfg.format), cfg.text_field))
    else:
        docs = [("hub", t) for t in _load_hub_texts(cfg)]
    docs = [(d, t) for d, t in docs if t and t.strip()]
    if cfg.max_documents is not None:
        docs = docs[:cfg.max_documents]
    if not docs:
        raise ConfigError(f"data: source {cfg.source!r} produced no non-empty documents")
    return docs


def _column(ds, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={field!r}: {where} has no such column; columns are "
                          f"{', '.join(ds.column_names)}")
    texts = ds[field]
    for row, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise ConfigError(f"data.text_field={field!r}: row {row} of {where} holds {type(t).__name__} "
                              f"{str(t)[:60]!r}, not text; point data.text_field at a column of strings")
    return [t for t in texts if t is not None]


def _load_file_texts(path: str, fmt: str, field: str) -> list[str]:
    """The documents of one local file; ConfigError naming the file (and line or row) when it
    cannot be read as ``fmt``, holds no document, or a document is not text."""
    if fmt == "parquet":
        texts = _parquet_texts(path, field)
    else:
        text = _utf8_text(path, fmt)
        # text: one document per blank-line-separated paragraph (as `datasets`' paragraph mode).
        texts = [p for p in text.split("\n\n") if p] if fmt == "text" else _json_texts(path, text, field)
    if not any(t.strip() for t in texts):
        what = "it is empty" if fmt == "text" else f"it is empty, or every {field!r} is null or blank"
        raise ConfigError(f"data.files: {path!r} holds no documents ({what}); remove it from data.files")
    return texts


def _utf8_text(path: str, fmt: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"data.files: {path!r} is not UTF-8 text (byte {exc.start}, line {line}; read as {fmt!r}): "
                          "a binary file, or another encoding? Convert it to UTF-8, or set data.format to its "
                          "format") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ConfigError(f"data.files: {path!r} holds NUL bytes (line {line}; read as {fmt!r}): a binary file? "
                          "Set data.format to its format, or fix its extension")
    return text.replace("\r\n", "\n")


def _json_texts(path: str, text: str, field: str) -> list[str]:
    """Documents of JSON Lines (one object per line) or of one JSON list of objects."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data.files: {path!r} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        numbered, unit = list(enumerate(rows, start=1)), "item"
    else:
        numbered, unit = [], "line"
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"data.files: {path!r} line {lineno}: not valid JSON ({exc.msg}); each line of a "
                                  "JSONL file holds one JSON object") from None
    texts, seen_field = [], False
    for n, row in numbered:
        if not isinstance(row, dict):
            raise ConfigError(f"data.files: {path!r} {unit} {n} holds a JSON {type(row).__name__}, not an object "
                              f"with a {field!r} field")
        seen_field = seen_field or field in row
        value = row.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"data.files: {path!r} {unit} {n}: {field!r} holds {type(value).__name__} "
                              f"{json.dumps(value)[:60]}, not text; data.text_field must name a string field")
        texts.append(value)
    if numbered and not seen_field:
        keys = sorted({k for _, row in numbered for k in row})
        raise ConfigError(f"data.text_field={field!r}: {path!r} has no such field; its objects have "
                          f"{', '.join(map(repr, keys))}")
    return texts


def _parquet_texts(path: str, field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"data.files: {path!r} is not a readable Parquet file ({exc}); is it truncated, or "
                          "another format under a .parquet name (set data.format)?") from None
    if field not in table.column_names:
        raise ConfigError(f"data.text_field={field!r}: {path!r} has no such column; columns are "
                          f"{', '.join(table.column_names)}")
    column = table.column(field)
    if pa.types.is_dictionary(column.type) and pa.types.is_string(column.type.value_type):
        column = column.cast(pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        values = column.to_pylist()
        row = next((i for i, v in enumerate(values) if v is not None), 0)
        raise ConfigError(f"data.text_field={field!r}: {path!r} column {field!r} holds {column.type} values (row "
                          f"{row}: {str(values[row])[:60]!r}), not text; point data.text_field at a string column")
    return [t for t in column.to_pylist() if t is not None]


def _load_hub_texts(cfg: DataConfig) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split)
    except Exception as exc:  # network errors, unknown names: all surface as a config problem
        raise ConfigError(f"data.hub_name={cfg.hub_name!r}: could not load the dataset ({type(exc).__name__}: "
                          f"{exc}); without network access use data.source=files or embedded") from exc
    return _column(ds, cfg.text_field, f"hub dataset {cfg.hub_name!r}")


def split_documents(docs: Sequence[tuple[str, str]], *, eval_fraction: float, seed: int
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic held-out split by document (the same seed always holds out the same ones)."""
    r = random.Random(seed * 7919 + 17)
    train, held = [], []
    for doc in docs:
        (held if r.random() < eval_fraction else train).append(doc)
    if eval_fraction > 0 and not held and len(train) > 1:
        held.append(train.pop())
    if not train:
        raise ConfigError(f"data: all {len(docs)} documents went to the held-out split; lower data.eval_fraction")
    return train, held


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], output_path: str, *, vocab_size: int, seed: int = 0) -> str:
    """Train a sentencepiece BPE model on ``texts`` and write it atomically to ``output_path``."""
    import sentencepiece as spm

    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size} is too small for a tokenizer: use at least {MIN_TOKENIZER_VOCAB}")
    from megamoe.checkpoint.staged import remove_stale_legacy

    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_legacy(out_dir, (".tok-",))  # left by an interrupted training, once untouched for an hour
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    if not lines:
        raise ConfigError("tokenizer: no text to train on")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tok-") as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, hard_vocab_limit=False, num_threads=1, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, split_digits=True, minloglevel=2, input_sentence_size=2_000_000,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            shuffle_input_sentence=True)
        atomic_write(output_path, lambda tmp_file: shutil.copyfile(prefix + ".model", tmp_file))
    return output_path


def load_tokenizer(path: str):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path!r} does not exist")
    return spm.SentencePieceProcessor(model_file=path)


def encode_stream(sp, texts: Sequence[str]) -> np.ndarray:
    """Token ids of all ``texts``, each followed by EOS, as one int32 stream."""
    eos = sp.eos_id()
    out: list[int] = []
    for start in range(0, len(texts), 256):
        for ids in sp.encode(list(texts[start:start + 256])):
            out.extend(ids)
            out.append(eos)
    return np.asarray(out, dtype=np.int32)


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, S] sequences cut from a token stream (the incomplete tail is dropped)."""
    n = len(stream) // seq_len
    return np.ascontiguousarray(stream[:n * seq_len].reshape(n, seq_len))


# ----------------------------------------------------------------------------- prepared data
@dataclass
class PreparedData:
    """Cached, tokenised data: training sequences and held-out sequences per domain."""

    directory: str
    tokenizer_path: str
    vocab_size: int
    train_NS: np.ndarray
    eval_NS: dict[str, np.ndarray]
    meta: dict

    @property
    def num_train_tokens(self) -> int:
        return int(self.train_NS.size)


def cache_key(cfg: DataConfig, vocab_size: int) -> str:
    d = to_dict(cfg)
    d.pop("cache_dir", None)
    d.pop("seq_len", None)  # the cache holds streams; packing happens at load time
    d["vocab_size"] = vocab_size
    d["version"] = CACHE_VERSION
    stats = []
    for path in list(cfg.files) + ([cfg.tokenizer] if cfg.tokenizer else []):
        st = os.stat(path)
        stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    d["file_stats"] = stats
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_advice(directory: str) -> str:
    return f"delete the cache directory {directory} (it is rebuilt from the data on the next start)"


def prepare_data(cfg: DataConfig, *, vocab_size: int, cache_root: str, log=print) -> str:
    """Build the cache directory for ``cfg`` if it does not exist yet; return its path.

    An existing cache is verified against its manifest (:class:`CheckpointError` naming a
    damaged file). The cache is written through the staged protocol, so an interrupted
    preparation leaves nothing under the final name; its leftovers, and those of older
    megamoe versions (``.prep-*``), are removed at the next start. A second process
    preparing the same cache waits for the first and reuses its result.
    """
    from megamoe.checkpoint.integrity import MANIFEST_KEY, MANIFEST_NAME, verify_directory
    from megamoe.checkpoint.staged import StagedDirectory, recover_root, remove_stale_legacy

    final = os.path.join(cache_root, cache_key(cfg, vocab_size))
    recover_root(cache_root, busy="skip", log=log)
    remove_stale_legacy(cache_root, (".prep-",), log=log)
    if os.path.isfile(os.path.join(final, "meta.json")):
        verify_directory(final, marker="meta.json", advice=_cache_advice(final))
        return final
    os.makedirs(cache_root, exist_ok=True)
    docs = load_documents(cfg)
    train_docs, eval_docs = split_documents(docs, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    with StagedDirectory(final, wait=True, log=log) as staged:
        if os.path.isfile(os.path.join(final, "meta.json")):  # another process built it while we waited
            staged.abandon()
            return final
        tmp = str(staged.payload)
        tok_path = os.path.join(tmp, "tokenizer.model")
        if cfg.tokenizer:
            shutil.copyfile(cfg.tokenizer, tok_path)
        else:
            log(f"training a {vocab_size}-piece sentencepiece tokenizer on {len(train_docs)} documents")
            train_tokenizer((t for _, t in train_docs), tok_path, vocab_size=vocab_size, seed=cfg.seed)
        sp = load_tokenizer(tok_path)
        if sp.get_piece_size() > vocab_size:
            raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                              f"{sp.get_piece_size()} pieces ({cfg.tokenizer}); raise model.vocab_size")
        train_stream = encode_stream(sp, [t for _, t in train_docs])
        np.save(os.path.join(tmp, "train.npy"), train_stream)
        domains = sorted({d for d, _ in eval_docs})
        for i, dom in enumerate(domains):
            np.save(os.path.join(tmp, f"eval_{i}.npy"), encode_stream(sp, [t for d, t in eval_docs if d == dom]))
        meta = {"version": CACHE_VERSION, "source": cfg.source, "documents": len(docs),
                "train_documents": len(train_docs), "eval_documents": len(eval_docs),
                "train_tokens": int(train_stream.size), "eval_domains": domains,
                "tokenizer_pieces": sp.get_piece_size(), MANIFEST_KEY: MANIFEST_NAME}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return final


def load_prepared(directory: str, *, seq_len: int, vocab_size: int) -> PreparedData:
    """The cached data of ``directory`` (a damaged file raises :class:`CheckpointError` naming it)."""
    from megamoe.checkpoint.integrity import CheckpointError, numpy_load, read_json

    advice = _cache_advice(directory)
    meta = read_json(os.path.join(directory, "meta.json"), advice=advice)
    if not isinstance(meta, dict) or not isinstance(meta.get("eval_domains"), list):
        raise CheckpointError(os.path.join(directory, "meta.json"), "lacks the list of eval domains", advice)

    def tokens(name: str) -> np.ndarray:
        path = os.path.join(directory, name)
        arr = numpy_load(path, advice=advice)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() >= vocab_size)):
            raise CheckpointError(path, f"is not a stream of token ids below model.vocab_size={vocab_size} "
                                        f"(shape {arr.shape}, dtype {arr.dtype})", advice)
        return arr

    train = pack(tokens("train.npy"), seq_len)
    evals = {}
    for i, dom in enumerate(meta["eval_domains"]):
        seqs = pack(tokens(f"eval_{i}.npy"), seq_len)
        if len(seqs):
            evals[dom] = seqs
    return PreparedData(directory=directory, tokenizer_path=os.path.join(directory, "tokenizer.model"),
                        vocab_size=vocab_size, train_NS=train, eval_NS=evals, meta=meta)


# ----------------------------------------------------------------------------- batching
class ShuffledBatches:
    """Stateless, resumable batch order over N sequences.

    Global batch ``step`` (0-based) is a slice of epoch ``step // batches_per_epoch``'s
    permutation, seeded by (seed, epoch). A global batch of G = B * accum * world sequences
    is laid out as [accum, world, B]: micro step m of rank r reads row (m, r), so changing
    the world size while keeping G keeps the data order.
    """

    def __init__(self, num_sequences: int, global_batch: int, *, seed: int) -> None:
        if global_batch <= 0:
            raise ValueError("global_batch must be positive")
        if num_sequences < global_batch:
            raise ConfigError(f"data: the training split has {num_sequences} packed sequences, fewer than one "
                              f"global batch of {global_batch}; add data, or lower data.seq_len, "
                              "train.micro_batch_size or train.grad_accum_steps")
        self.num_sequences, self.global_batch, self.seed = num_sequences, global_batch, seed
        self.batches_per_epoch = num_sequences // global_batch
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.batches_per_epoch)
        return self.permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]

    def micro_indices(self, step: int, *, micro: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
        rows = self.global_indices(step).reshape(-1, world, micro_batch)
        return rows[micro, rank]


def eval_batches(evals: dict[str, np.ndarray], *, batch_size: int, world: int, max_batches: int | None
                 ) -> list[tuple[str, np.ndarray]]:
    """Held-out batches, each from one domain, interleaved across domains and trimmed to a
    multiple of ``world`` (every rank must run the same number of forwards under EP)."""
    per_domain = {d: [s[i:i + batch_size] for i in range(0, len(s), batch_size)] for d, s in evals.items()}
    out: list[tuple[str, np.ndarray]] = []
    longest = max((len(v) for v in per_domain.values()), default=0)
    for i in range(longest):
        for d in sorted(per_domain):
            if i < len(per_domain[d]):
                out.append((d, per_domain[d][i]))
    if max_batches is not None:
        out = out[:max_batches]
    out = out[:len(out) // world * world]
    return out


__all__ = ["load_documents", "split_documents", "train_tokenizer", "load_tokenizer", "encode_stream", "pack",
           "prepare_data", "load_prepared", "PreparedData", "ShuffledBatches", "eval_batches", "file_format"]
