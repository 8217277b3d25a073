"""Nothing lost, nothing silent: ``megamoe train`` checkpoints (torch backend) under damage and kills.

- Every file of a checkpoint, truncated, with changed bytes or deleted: verification, loading
  and ``megamoe convert`` name the file; ``--resume`` skips the damaged checkpoint, says why,
  and continues from the newest one that verifies, repeating the uninterrupted run exactly.
- A kill (``os._exit``, no cleanup) at every point of the save protocol, for a first save, a
  later save with rotation, and a re-save of an existing step: a complete checkpoint stays
  reachable, and ``--resume`` finishes the run exactly as an uninterrupted one.
- Non-finite weights are never written; a damaged data cache, a full disk, outputs that
  overlap their inputs or sit under a regular file: one clear error each, nothing half-written.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megamoe.checkpoint.integrity import MANIFEST_NAME, CheckpointError, NonFiniteWeightsError
from megamoe.checkpoint.staged import CRASH_ENV, CRASH_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "tiny_single.yaml")
TINY = ["parallel.backend=torch", "parallel.ep_size=1", "model.vocab_size=256", "model.hidden_size=32",
        "model.num_heads=2", "model.max_seq_len=32", "model.moe.num_experts=4",
        "model.moe.experts.intermediate_size=32",
        "data.embedded_docs=420", "data.seq_len=32", "data.eval_fraction=0.1", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.lr=0.01", "train.threads=1", "train.progress=false", "train.plots=false",
        "train.tensorboard=false", "train.steps=6", "train.save_interval=2", "train.eval_interval=0",
        "model.moe.router.jitter_eps=0.1"]  # the RNG state is part of what a resume must restore
KEYS = ("loss", "aux_loss", "lr", "grad_norm", "max_vio_layers", "load")


def _overrides(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.output_dir={out}", f"data.cache_dir={cache}", *extra]


def _train(out: Path, cache: Path, *extra: str, resume=None):
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training
    return run_training(load_config(CFG, _overrides(out, cache, *extra)), resume=resume)


def _train_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", *KEYS)} for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted 6-step run keeping step_2, step_4 and step_6."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(out, cache, "train.keep_last=3")
    return out


def _killed_at_4(reference: Path, dst: Path) -> Path:
    """The reference run as a kill right after its step-4 checkpoint would leave it."""
    shutil.copytree(reference, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000006")
    (dst / "checkpoints" / "latest").write_text("step_00000004\n")
    return dst


def test_checkpoint_files_and_manifest(reference):
    step = reference / "checkpoints" / "step_00000004"
    files = sorted(os.listdir(step))
    assert files == ["megamoe_config.json", MANIFEST_NAME, "model.safetensors", "optimizer.pt", "rng_rank0.pt",
                     "tokenizer.model"]
    listed = json.loads((step / MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == [f for f in files if f != MANIFEST_NAME]
    assert json.loads((step / "megamoe_config.json").read_text())["manifest"] == MANIFEST_NAME
    assert sorted(os.listdir(reference / "checkpoints")) == ["latest", "step_00000002", "step_00000004",
                                                             "step_00000006"]


# ------------------------------------------------------------------ damage x every file
def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip(p: Path) -> None:
    # Bytes in the middle: inside the tensor data of .pt / .safetensors files, which load without
    # complaint (16k NaN weights in the report this test answers); the manifest catches them.
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, min(len(b), len(b) // 2 + 64)):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


DAMAGE = {"truncate": _truncate, "flip": _flip, "delete": Path.unlink}
CKPT_FILES = ["megamoe_config.json", MANIFEST_NAME, "model.safetensors", "optimizer.pt", "rng_rank0.pt",
              "tokenizer.model"]
CASES = [(f, d) for f in CKPT_FILES for d in DAMAGE]


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_damaged_file_is_named_and_resume_falls_back(tmp_path, cache, reference, capsys, name, damage):
    from megamoe import cli
    from megamoe.train.trainer import load_trained_model, verify_checkpoint

    run = _killed_at_4(reference, tmp_path / "run")
    step4 = run / "checkpoints" / "step_00000004"
    DAMAGE[damage](step4 / name)
    named = str(step4 / name)

    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(str(step4))
    assert err.value.path == named
    with pytest.raises(CheckpointError, match="use another checkpoint|resume from another checkpoint") as err:
        load_trained_model(str(step4))
    assert err.value.path == named
    assert cli.main(["convert", str(step4), str(tmp_path / "hf")]) == 2
    assert f"error: {named}" in capsys.readouterr().err and not (tmp_path / "hf").exists()

    _train(run, cache, "train.keep_last=3", resume="latest")
    log = capsys.readouterr().err
    assert f"--resume: skipping step_00000004: {named}" in log
    assert "resumed from " + str(run / "checkpoints" / "step_00000002") in log
    assert _train_records(run) == _train_records(reference)  # steps 3-6 redone exactly
    verify_checkpoint(str(step4))  # replaced by the good copy when training reached it again


def test_resume_refuses_when_no_checkpoint_verifies_and_an_explicit_one_is_not_replaced(tmp_path, cache, reference):
    from megamoe.train.trainer import find_resume_checkpoint
    run = _killed_at_4(reference, tmp_path / "run")
    _flip(run / "checkpoints" / "step_00000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: does not match its sha256"):
        find_resume_checkpoint(str(run), str(run / "checkpoints" / "step_00000004"))  # no fallback when named
    _flip(run / "checkpoints" / "step_00000002" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoint\(s\) verifies .*nothing was loaded"):
        find_resume_checkpoint(str(run), "latest")


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path, cache, reference, capsys):
    from megamoe.train.trainer import load_trained_model
    run = _killed_at_4(reference, tmp_path / "run")
    step4 = run / "checkpoints" / "step_00000004"
    (step4 / MANIFEST_NAME).unlink()
    meta = json.loads((step4 / "megamoe_config.json").read_text())
    del meta["manifest"]
    (step4 / "megamoe_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no megamoe_manifest.json .*loading it unverified"):
        load_trained_model(str(step4))
    _train(run, cache, "train.keep_last=3", resume="latest")
    assert "has no megamoe_manifest.json" in capsys.readouterr().err
    assert _train_records(run) == _train_records(reference)


def test_old_checkpoint_with_damaged_weights_is_refused_after_loading(tmp_path, reference):
    # No manifest to catch it: the NaN the damage produced is caught after the load.
    from safetensors.torch import load_file, save_file

    from megamoe.train.trainer import load_trained_model
    step = tmp_path / "step"
    shutil.copytree(reference / "checkpoints" / "step_00000004", step)
    (step / MANIFEST_NAME).unlink()
    meta = json.loads((step / "megamoe_config.json").read_text())
    del meta["manifest"]
    (step / "megamoe_config.json").write_text(json.dumps(meta))
    state = load_file(str(step / "model.safetensors"))
    key = next(k for k in state if "gate_up_proj" in k)
    state[key][0, 0, :3] = float("nan")
    save_file(state, str(step / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning), pytest.raises(CheckpointError,
                                                  match=rf"NaN or inf in 1 weight.*{key} \(3 values\)"):
        load_trained_model(str(step))


# ------------------------------------------------------------------ non-finite weights are never written
def test_nonfinite_weights_are_never_written(tmp_path, cache, reference):
    import torch

    from megamoe.model import MoETransformerLM
    from megamoe.train.backends import TorchBackend
    from megamoe.train.config import load_config
    from megamoe.train.trainer import save_checkpoint

    run = _killed_at_4(reference, tmp_path / "run")
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    cfg = load_config(CFG, _overrides(run, cache, "train.keep_last=1"))
    backend = TorchBackend(MoETransformerLM(cfg.model), cfg, device=torch.device("cpu"))
    with torch.no_grad():
        backend.model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError,
                       match=r"model\.layers\.1\.mlp\.experts\.down_proj \(1 values\).*Nothing was "
                                                    "written; the earlier checkpoints are intact"):
        save_checkpoint(cfg, backend, None, 6, 1, str(run / "checkpoints"))
    # Nothing written, nothing rotated away (keep_last=1 would have removed step_2 and step_4).
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ kills at every point of the save protocol
DRIVER = textwrap.dedent("""
    import json, sys
    from megamoe.train.config import load_config
    from megamoe.train.trainer import run_training
    run_training(load_config(sys.argv[1], json.loads(sys.argv[2])), resume=json.loads(sys.argv[3]))
""")


def _killed_run(out: Path, cache: Path, point: str, *extra: str, resume=None) -> None:
    env = {**os.environ, CRASH_ENV: point, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, CFG, json.dumps(_overrides(out, cache, *extra)),
                           json.dumps(resume)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == CRASH_EXIT_CODE, f"never reached {point}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


def _reachable(root: Path, name: str) -> bool:
    """A complete (manifest-verified) copy of ``name`` exists: published, staged-and-sealed, or moved aside."""
    from megamoe.checkpoint.integrity import verify_directory
    for copy in (root / name, root / f".{name}.staging" / name, root / f".{name}.old"):
        if (copy / MANIFEST_NAME).is_file():
            verify_directory(copy)
            return True
    return False


FIRST = ["stage.created", "save.partial", "stage.filled", "stage.sealed", "publish.renamed", "publish.done",
         "save.latest"]
LATER = FIRST + ["save.rotated_one"]
RESAVE = ["stage.created", "save.partial", "stage.filled", "stage.sealed", "publish.moved_old", "publish.renamed",
          "publish.done"]
KILLS = ([("first", p) for p in FIRST] + [("later", p) for p in LATER] + [("resave", p) for p in RESAVE])


@pytest.mark.slow
@pytest.mark.parametrize("scenario,point", KILLS, ids=[f"{s}-{p}" for s, p in KILLS])
def test_kill_at_every_point_of_the_save_protocol(tmp_path, cache, reference, scenario, point):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    if scenario == "first":  # the first save of a fresh run (step 2): nothing to lose yet
        _killed_run(run, cache, point, "train.keep_last=1")
        must_survive = ["step_00000002"] if point in ("publish.renamed", "publish.done", "save.latest") else []
    elif scenario == "later":  # saving step 4 next to step 2, keep_last=1 rotates step 2 away
        _killed_at_4(reference, run)
        for name in ("step_00000004", "step_00000006"):
            shutil.rmtree(ckpts / name, ignore_errors=True)
        _killed_run(run, cache, point, "train.keep_last=1", resume="latest")
        must_survive = ["step_00000002"] if point in FIRST[:4] else ["step_00000004"]
    else:  # re-saving step 4 (resumed from step 2 while step 4 exists): the old step 4 goes only by the swap
        _killed_at_4(reference, run)
        _killed_run(run, cache, point, "train.keep_last=3", resume=str(ckpts / "step_00000002"))
        must_survive = ["step_00000002", "step_00000004"]
    for name in must_survive:
        assert _reachable(ckpts, name), f"no complete copy of {name} after a kill at {point}"

    _train(run, cache, "train.keep_last=3", resume="latest")  # recovers, then finishes the run
    assert _train_records(run) == _train_records(reference)
    left = sorted(os.listdir(ckpts))
    assert [n for n in left if n.startswith(".")] == []  # staging, old, lock: all recovered or removed
    for name in must_survive + ["step_00000006"]:
        assert (ckpts / name / MANIFEST_NAME).is_file()


def test_staging_left_by_an_older_megamoe_is_recovered_when_it_is_the_only_copy(tmp_path, cache, reference, capsys):
    run = _killed_at_4(reference, tmp_path / "run")
    ckpts = run / "checkpoints"
    # The old protocol deleted step_N before renaming .tmp-step_N in; a kill in between left the
    # only copy there (the next start used to delete it). A torn one (no RNG file) is removed.
    os.replace(ckpts / "step_00000004", ckpts / ".tmp-step_00000004")
    shutil.copytree(ckpts / "step_00000002", ckpts / ".tmp-step_00000006")
    (ckpts / ".tmp-step_00000006" / "rng_rank0.pt").unlink()
    _train(run, cache, "train.keep_last=3", resume="latest")
    log = capsys.readouterr().err
    assert f"recovered {ckpts / 'step_00000004'} from .tmp-step_00000004" in log
    assert "resumed from " + str(ckpts / "step_00000004") in log
    assert _train_records(run) == _train_records(reference)
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002", "step_00000004", "step_00000006"]


def test_a_fresh_run_does_not_mix_in_a_killed_runs_sealed_checkpoint(tmp_path, cache, reference):
    from megamoe.config import ConfigError
    run = _killed_at_4(reference, tmp_path / "run")
    ckpts = run / "checkpoints"
    for name in ("step_00000002", "step_00000004"):  # killed after sealing, before publishing: not published yet
        (ckpts / f".{name}.staging").mkdir()
        os.replace(ckpts / name, ckpts / f".{name}.staging" / name)
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run"):
        _train(run, cache)


# ------------------------------------------------------------------ the data cache
def test_a_damaged_data_cache_is_named_with_what_to_do(tmp_path, reference, cache):
    own_cache = tmp_path / "cache"
    shutil.copytree(cache, own_cache)
    (key,) = [d for d in os.listdir(own_cache) if not d.startswith(".")]
    _flip(own_cache / key / "train.npy")
    argv = ["train", "--config", CFG, *_overrides(tmp_path / "run", own_cache)]
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert f"{own_cache / key / 'train.npy'}: does not match its sha256" in proc.stderr
    assert f"delete the cache directory {own_cache / key}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupted_preparation_leftovers_are_cleaned_at_the_next_start(tmp_path, cache):
    from megamoe.checkpoint.staged import DirLock
    from megamoe.train.config import load_config
    from megamoe.train.data import prepare_data

    own = tmp_path / "cache"
    (own / ".prep-abc123").mkdir(parents=True)  # an older megamoe's, stale
    os.utime(own / ".prep-abc123", (0, 0))
    (own / ".k1.staging" / "k1").mkdir(parents=True)  # this protocol's, its writer dead
    (own / ".k2.staging" / "k2").mkdir(parents=True)  # a live writer's: left alone
    live = DirLock.acquire(own / ".k2.lock")
    try:
        cfg = load_config(CFG, _overrides(tmp_path / "run", own))
        final = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size, cache_root=str(own), log=lambda m: None)
        assert sorted(os.listdir(own)) == [".k2.lock", ".k2.staging", os.path.basename(final)]
    finally:
        live.release()


# ------------------------------------------------------------------ disk full
def test_a_full_disk_during_a_save_is_a_clear_error_and_loses_nothing(tmp_path, cache, reference):
    run = _killed_at_4(reference, tmp_path / "run")
    # optimizer.pt is ~420 kB, everything else of a checkpoint and the cache is smaller.
    code = textwrap.dedent("""
        import resource, signal, runpy, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        sys.argv = ["megamoe"] + sys.argv[1:]
        runpy.run_module("megamoe.cli", run_name="__main__")
    """)
    argv = ["train", "--config", CFG, *_overrides(run, cache, "train.keep_last=1"), "--resume"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"writing {run / 'checkpoints' / 'step_00000006'} failed: the disk is full" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    from megamoe.train.trainer import verify_checkpoint
    assert verify_checkpoint(str(run / "checkpoints" / "step_00000004")).verified


# ------------------------------------------------------------------ outputs vs inputs, paths under files
def test_convert_never_writes_over_or_into_its_source(tmp_path, reference, capsys):
    from megamoe import cli
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpts, step = run / "checkpoints", run / "checkpoints" / "step_00000006"
    (tmp_path / "link").symlink_to(step)
    (tmp_path / "afile").write_text("x")
    before = sorted(str(p) for p in ckpts.rglob("*"))
    cases = [
        ([str(step), str(step)], "is the input"),
        ([str(step), str(step), "--overwrite"], "is the input"),
        ([str(step), str(ckpts), "--overwrite"], "contains the input"),
        ([str(step), str(run), "--overwrite"], "contains the input"),
        ([str(step), str(step / "hf")], "lies inside the input"),
        ([str(tmp_path / "link"), str(step), "--overwrite"], "is the input"),
        ([str(step), str(tmp_path / "link"), "--overwrite"], "is the input"),
        ([str(ckpts), str(step / "hf"), "--tag", "step_00000006"], "lies inside the input"),
        ([str(step), str(tmp_path / "afile" / "hf")], "is a file, not a directory"),
        ([str(step), str(tmp_path / "hf"), "--tag", "engine"], "is a single checkpoint with no tags"),
    ]
    for argv, message in cases:
        assert cli.main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert sorted(str(p) for p in ckpts.rglob("*")) == before  # nothing deleted or added
    # --tag is honoured: a step of a run's checkpoints folder, and the folder's latest by default.
    assert cli.main(["convert", str(ckpts), str(tmp_path / "hf2"), "--tag", "step_00000002"]) == 0
    assert cli.main(["convert", str(ckpts), str(tmp_path / "hf6")]) == 0
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() != (tmp_path / "hf6" / "model.safetensors").read_bytes()
    assert cli.main(["convert", str(step), str(tmp_path / "hf6b")]) == 0
    assert (tmp_path / "hf6b" / "model.safetensors").read_bytes() == (tmp_path / "hf6" / "model.safetensors").read_bytes()


def test_train_and_tokenizer_refuse_outputs_that_would_destroy_inputs(tmp_path, capsys):
    from megamoe import cli
    (tmp_path / "afile").write_text("x")
    data = tmp_path / "out" / "checkpoints" / "corpus.txt"
    data.parent.mkdir(parents=True)
    data.write_text("some text\n" * 50)
    cases = [
        (["train", "--config", CFG, f"train.output_dir={tmp_path / 'afile' / 'run'}"], "is a file, not a directory"),
        (["train", "--config", CFG, f"train.output_dir={tmp_path / 'afile'}"], "exists and is a file"),
        (["train", "--config", CFG, "data.source=files", f"data.files=[{data}]",
          f"train.output_dir={tmp_path / 'out'}"],
         "lies in"),
        (["train", "--config", CFG, f"data.cache_dir={tmp_path / 'out' / 'checkpoints' / 'c'}",
          f"train.output_dir={tmp_path / 'out'}"], "lies in"),
        (["tokenizer", "--files", str(data), "--output", str(data)], "is the input"),
        (["tokenizer", "--files", str(data), "--output", str(tmp_path / "afile" / "tok.model")],
         "is a file, not a directory"),
        (["rl", "--out", str(tmp_path / "afile" / "rl"), "--steps", "10"], "is a file, not a directory"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert data.read_text() == "some text\n" * 50
