"""CLI commands x bad arguments: each is a named error (exit status 2 and the option or field in
the message), never a traceback or a silent fallback; and overrides are accepted wherever they
stand on the command line (``--resume k=v k=v``)."""
from __future__ import annotations

import os

import pytest
import yaml

from megamoe import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINGLE_CFG = os.path.join(ROOT, "configs", "tiny_single.yaml")


def _main(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


CASES = [
    # train: config problems are reported before anything runs
    (["train", "--config", "no/such.yaml"], "config file 'no/such.yaml' does not exist"),
    (["train", "--config", SINGLE_CFG, "train.lr=.inf"], "train.lr=inf is invalid: must be a finite number > 0"),
    (["train", "--config", SINGLE_CFG, "train.grad_clip=.nan"], "train.grad_clip=nan is invalid"),
    (["train", "--config", SINGLE_CFG, "model.tie_embeddings=maybe"], "model.tie_embeddings='maybe' is invalid"),
    (["train", "--config", SINGLE_CFG, "model.num_kv_heads=0"], "model.num_kv_heads=0 is invalid"),
    (["train", "--config", SINGLE_CFG, "train.nonfinite=ignore"], "train.nonfinite='ignore' is invalid: allowed "
                                                                  "values are 'error', 'skip'"),
    (["train", "--config", SINGLE_CFG, "steps"], "override 'steps' is invalid: write key=value"),
    (["train", "--config", SINGLE_CFG, "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--config", SINGLE_CFG, "train.steps=3", "--overwrite", "loose-word"],
     "unrecognized arguments: loose-word"),
    (["train", "--config", SINGLE_CFG, "parallel.backend=deepspeed", "parallel.zero_stage=0", "train.nonfinite=skip"],
     "train.nonfinite='skip' is invalid with parallel.backend='deepspeed', zero_stage=0"),
    # tokenizer: no silent fallback to 4096 pieces
    (["tokenizer", "--output", "x.model", "--files", "a.txt", "--vocab-size", "0"],
     "argument --vocab-size: must be an integer >= 32, got '0'"),
    (["tokenizer", "--output", "x.model", "--files", "a.txt", "--vocab-size", "31"], "must be an integer >= 32"),
    (["tokenizer", "--output", "x.model", "--files", "a.txt", "--vocab-size", "4k"], "got '4k'"),
    (["tokenizer", "--output", "x.model", "--config", SINGLE_CFG, "model.vocab_size=abc"],
     "model.vocab_size='abc' is invalid: must be an integer >= 1"),
    (["tokenizer", "--output", "x.model", "--config", SINGLE_CFG, "data=[1]"], "data=[1] is invalid"),
    # rl: options checked like config fields; the replay buffer must hold a batch
    (["rl", "--buffer-size", "10", "--batch-size", "32", "--steps", "5"],
     "SACConfig.buffer_size=10 is invalid: must be >= batch_size=32"),
    (["rl", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["rl", "--tau", "0"], "argument --tau: must be a finite number in (0, 1], got '0'"),
    (["rl", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["rl", "--alpha", "inf"], "argument --alpha: must be a finite number > 0, got 'inf'"),
    (["rl", "--gamma", "1.01"], "argument --gamma: must be a finite number in [0, 1]"),
    (["rl", "--steps", "1.5"], "argument --steps: must be an integer >= 1, got '1.5'"),
    (["rl", "--eval-every", "-1"], "argument --eval-every: must be an integer >= 0"),
    (["rl", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_cli_arguments_are_named_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "a.txt").write_text("some text\n")
    rc, out = _main(argv, capsys)
    assert rc == 2, out
    assert message in out, out
    assert "Traceback" not in out


def test_empty_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    rc, out = _main(["train", "--config", str(tmp_path / "empty.yaml")], capsys)
    assert rc == 2 and "holds no settings" in out and "leave out --config" in out


@pytest.mark.parametrize("argv", [
    ["--config", SINGLE_CFG, "train.steps=7", "--overwrite", "train.lr=0.5"],
    ["--config", SINGLE_CFG, "--resume", "train.steps=7", "train.lr=0.5"],
    ["--config", SINGLE_CFG, "train.steps=7", "--resume", "train.lr=0.5", "--overwrite"],
    ["train.steps=7", "--config", SINGLE_CFG, "--resume", "train.lr=0.5"],
])
def test_overrides_are_taken_wherever_they_stand(argv, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc, out = _main(["train", *argv, "--print-config"], capsys)
    assert rc == 0, out
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["train"]["lr"] == 0.5
