"""Bad local data files: each corruption is a ConfigError naming the file and the line or row.

A table of (file name, how to write it, text_field, what the error must say); every case is
read through ``load_documents`` as ``megamoe train`` reads ``data.files``.
"""
from __future__ import annotations

import json

import pytest

from megamoe.config import ConfigError
from megamoe.train.config import DataConfig
from megamoe.train.data import load_documents


def _parquet(table: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table(table), buf)
    return buf.getvalue()


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_PARQUET = _parquet({"text": ["one document", "another document"] * 20})

CASES = [
    # (file name, content, text_field, regex the message must match (the file name is checked too))
    ("empty.txt", b"", "text", r"holds no documents \(it is empty\)"),
    ("blank.txt", b"\n\n   \n\n", "text", r"holds no documents"),
    ("binary.txt", bytes(range(256)) * 4, "text", r"is not UTF-8 text \(byte 128, line 2"),  # byte 10 is a newline
    ("latin1.txt", "caf\u00e9 au lait\n\nna\u00efve\n".encode("latin-1"), "text", r"is not UTF-8 text \(byte 3, line 1"),
    ("nul.txt", b"fine line\nbad \x00 line\n", "text", r"holds NUL bytes \(line 2"),
    ("empty.jsonl", b"", "text", r"holds no documents \(it is empty"),
    ("malformed.jsonl", _jsonl({"text": "a"}, {"text": "b"}) + b'{"text": "c"\n', "text",
     r"line 3: not valid JSON"),
    ("list_field.jsonl", _jsonl({"text": "a"}, {"text": ["x", "y"]}), "text", r"line 2: 'text' holds list"),
    ("number_field.jsonl", _jsonl({"text": 3.5}), "text", r"line 1: 'text' holds float 3.5"),
    ("int_field.jsonl", _jsonl({"text": "ok"}, {"text": "ok"}, {"text": 7}), "text", r"line 3: 'text' holds int 7"),
    ("dict_field.jsonl", _jsonl({"text": {"a": 1}}), "text", r"line 1: 'text' holds dict"),
    ("bool_field.jsonl", _jsonl({"text": True}), "text", r"line 1: 'text' holds bool true"),
    ("not_object.jsonl", _jsonl({"text": "a"}, ["text", "b"]), "text", r"line 2 holds a JSON list, not an object"),
    ("no_field.jsonl", _jsonl({"body": "a"}, {"body": "b"}), "text", r"has no such field; its objects have 'body'"),
    ("all_null.jsonl", _jsonl({"text": None}, {"text": None}), "text", r"holds no documents"),
    ("array_bad_item.json", b'[{"text": "a"},\n {"text": 5}]', "text", r"item 2: 'text' holds int 5"),
    ("array_truncated.json", b'[{"text": "a"},\n {"text": "b"', "text", r"line 2: not valid JSON"),
    ("parquet_in_disguise.jsonl", GOOD_PARQUET, "text", r"is not UTF-8 text"),
    ("truncated.parquet", GOOD_PARQUET[:len(GOOD_PARQUET) // 2], "text", r"is not a readable Parquet file"),
    ("zero_bytes.parquet", b"", "text", r"is not a readable Parquet file"),
    ("json_in_disguise.parquet", _jsonl({"text": "a"}), "text", r"is not a readable Parquet file"),
    ("int_column.parquet", _parquet({"text": [1, 2, 3]}), "text", r"column 'text' holds int64 values \(row 0"),
    ("list_column.parquet", _parquet({"text": [None, ["a"], ["b"]]}), "text",
     r"column 'text' holds list<.*string> values \(row 1"),
    ("no_column.parquet", _parquet({"body": ["a"]}), "text", r"has no such column; columns are body"),
    ("empty_column.parquet", _parquet({"text": ["", " "]}), "text", r"holds no documents"),
]


@pytest.mark.parametrize("name, content, field, message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_file_is_a_named_error(tmp_path, name, content, field, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as exc:
        load_documents(DataConfig(source="files", files=(str(path),), text_field=field))
    assert name in str(exc.value)


def test_good_files_still_read_as_before(tmp_path):
    (tmp_path / "a.txt").write_text("first\r\nstill first\r\n\r\nsecond\n")
    (tmp_path / "b.jsonl").write_bytes(_jsonl({"text": "j1"}, {"text": None}, {"other": 1}, {"text": "j2"}) + b"\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "arr1"}, {"text": "arr2"}]))
    (tmp_path / "d.parquet").write_bytes(_parquet({"text": ["p1", None, "p2"]}))
    files = tuple(str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.json", "d.parquet"))
    docs = load_documents(DataConfig(source="files", files=files))
    assert [t for _, t in docs] == ["first\nstill first", "second\n", "j1", "j2", "arr1", "arr2", "p1", "p2"]
    assert [d for d, _ in docs] == ["a", "a", "b", "b", "c", "c", "d", "d"]


def test_hub_dataset_columns_must_hold_text():
    import datasets

    from megamoe.train.data import _column
    with pytest.raises(ConfigError, match=r"row 0 of hub dataset 'x' holds list '\[1\]', not text"):
        _column(datasets.Dataset.from_list([{"text": [1]}, {"text": [2]}]), "text", "hub dataset 'x'")
    assert _column(datasets.Dataset.from_list([{"text": "a"}, {"text": None}]), "text", "x") == ["a"]
