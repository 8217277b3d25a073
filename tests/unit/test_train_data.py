"""The data pipeline: embedded corpus, held-out split, tokenizer, packing, resumable shuffling."""
import json
import os

import numpy as np
import pytest

from megamoe.config import ConfigError
from megamoe.train.config import DataConfig
from megamoe.train.corpus import DOMAINS, generate_corpus
from megamoe.train.data import (ShuffledBatches, encode_stream, eval_batches, load_documents, load_prepared,
                                load_tokenizer, pack, prepare_data, split_documents, train_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CFG = os.path.join(ROOT, "configs", "tiny.yaml")


def test_embedded_corpus_is_deterministic_and_multi_domain():
    a, b = generate_corpus(70, seed=3), generate_corpus(70, seed=3)
    assert a == b
    assert generate_corpus(70, seed=4) != a
    assert {d for d, _ in a} == set(DOMAINS)
    # Domains are distinct: a domain's characteristic words never occur in the others.
    markers = {"arithmetic": "calc:", "code": "def ", "recipes": "Recipe for", "weather": "Weather report",
               "dna": "gene ", "chess": "[Game]", "stories": "Once upon a time"}
    for domain, text in a:
        assert markers[domain] in text
        assert not any(markers[o] in text for o in markers if o != domain)


def test_split_is_deterministic_disjoint_and_complete():
    docs = [("d", f"doc {i}") for i in range(500)]
    train, held = split_documents(docs, eval_fraction=0.1, seed=5)
    assert (train, held) == split_documents(docs, eval_fraction=0.1, seed=5)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert 20 < len(held) < 80
    assert split_documents(docs, eval_fraction=0.1, seed=6)[1] != held


def test_pack_cuts_the_stream_into_sequences():
    stream = np.arange(23, dtype=np.int32)
    seqs = pack(stream, 5)
    assert seqs.shape == (4, 5)
    np.testing.assert_array_equal(seqs.reshape(-1), stream[:20])


def test_tokenizer_trains_on_tiny_corpus_and_round_trips(tmp_path):
    texts = [t for _, t in generate_corpus(210, seed=0)]
    path = train_tokenizer(texts, str(tmp_path / "sp.model"), vocab_size=300)
    assert os.listdir(tmp_path) == ["sp.model"]  # no temporary files left behind
    sp = load_tokenizer(path)
    assert sp.get_piece_size() <= 300
    for text in texts[:14]:
        assert sp.decode(sp.encode(text)) == text
    stream = encode_stream(sp, texts[:3])
    assert (stream == sp.eos_id()).sum() == 3 and stream[-1] == sp.eos_id()
    # A trained tokenizer compresses: fewer pieces than characters.
    assert len(stream) < 0.6 * sum(len(t) for t in texts[:3])


def test_shuffled_batches_are_stateless_permutations():
    s = ShuffledBatches(50, 8, seed=1)
    assert s.batches_per_epoch == 6
    epoch0 = np.concatenate([s.global_indices(i) for i in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats inside an epoch
    epoch1 = np.concatenate([s.global_indices(i) for i in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    fresh = ShuffledBatches(50, 8, seed=1)  # a resumed process asks for step 9 first
    np.testing.assert_array_equal(fresh.global_indices(9), s.global_indices(9))
    assert not np.array_equal(ShuffledBatches(50, 8, seed=2).global_indices(0), s.global_indices(0))


def test_micro_batches_keep_the_data_order_across_world_sizes():
    s = ShuffledBatches(64, 8, seed=0)
    one = [s.micro_indices(3, micro=m, rank=0, world=1, micro_batch=4) for m in range(2)]
    two = [s.micro_indices(3, micro=0, rank=r, world=2, micro_batch=4) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(one), np.concatenate(two))
    np.testing.assert_array_equal(np.concatenate(one), s.global_indices(3))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        ShuffledBatches(10, 16, seed=0)


def test_eval_batches_trim_to_world_and_keep_domains_pure():
    evals = {"a": np.zeros((5, 4), np.int32), "b": np.ones((3, 4), np.int32)}
    batches = eval_batches(evals, batch_size=2, world=2, max_batches=None)
    assert len(batches) == 4 and [d for d, _ in batches] == ["a", "b", "a", "b"]
    for d, seqs in batches:
        assert (seqs == (0 if d == "a" else 1)).all()
    assert len(eval_batches(evals, batch_size=2, world=3, max_batches=None)) == 3


def test_prepare_data_caches_atomically(tmp_path):
    cfg = DataConfig(embedded_docs=140, eval_fraction=0.1, seed=2)
    d1 = prepare_data(cfg, vocab_size=256, cache_root=str(tmp_path), log=lambda m: None)
    stamp = os.stat(os.path.join(d1, "train.npy")).st_mtime_ns
    d2 = prepare_data(cfg, vocab_size=256, cache_root=str(tmp_path), log=lambda m: None)
    assert d1 == d2 and os.stat(os.path.join(d2, "train.npy")).st_mtime_ns == stamp
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    data = load_prepared(d1, seq_len=16, vocab_size=256)
    meta = json.load(open(os.path.join(d1, "meta.json")))
    assert meta["train_documents"] + meta["eval_documents"] == 140
    assert data.train_NS.shape[1] == 16 and data.train_NS.max() < 256
    assert set(data.eval_NS) <= set(DOMAINS) and len(data.eval_NS) >= 3
    # A different data config gets its own cache entry.
    assert prepare_data(DataConfig(embedded_docs=140, eval_fraction=0.1, seed=3), vocab_size=256,
                        cache_root=str(tmp_path), log=lambda m: None) != d1


def test_local_text_jsonl_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "notes.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "web.jsonl").write_text("\n".join(json.dumps({"body": f"json doc {i}"}) for i in range(3)) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), tmp_path / "shard.parquet")
    files = (str(tmp_path / "notes.txt"), str(tmp_path / "web.jsonl"), str(tmp_path / "shard.parquet"))
    docs = load_documents(DataConfig(source="files", files=files, text_field="body"))
    assert [d for d, _ in docs] == ["notes"] * 2 + ["web"] * 3 + ["shard"] * 2
    assert docs[0][1].startswith("first paragraph") and docs[2][1] == "json doc 0" and docs[-1][1] == "parquet two"
    with pytest.raises(ConfigError, match=r"data.text_field='text'.*web\.jsonl' has no such field.*'body'"):
        load_documents(DataConfig(source="files", files=files[1:2]))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        load_documents(DataConfig(source="files", files=(str(tmp_path / "x.csv"),)))


def test_tokenizer_command_and_loading_its_model(tmp_path, capsys):
    from megamoe import cli
    out = str(tmp_path / "tok" / "sp.model")
    rc = cli.main(["tokenizer", "--config", TINY_CFG, "--output", out, "--vocab-size", "256",
                   "data.embedded_docs=140"])
    assert rc == 0 and os.path.isfile(out) and "256 pieces" in capsys.readouterr().out
    cfg = DataConfig(embedded_docs=140, tokenizer=out)
    data = load_prepared(prepare_data(cfg, vocab_size=256, cache_root=str(tmp_path / "c"), log=lambda m: None),
                         seq_len=16, vocab_size=256)
    assert open(data.tokenizer_path, "rb").read() == open(out, "rb").read()
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer's 256 pieces"):
        prepare_data(cfg, vocab_size=100, cache_root=str(tmp_path / "c"), log=lambda m: None)
    assert cli.main(["tokenizer", "--output", out, "--files", str(tmp_path / "nope.txt")]) == 2
