"""Checkpoint integrity and the staged-directory protocol on plain files (no training):
manifests catch every kind of damage, each protocol state a kill can leave recovers to a
complete copy, outputs never overlap their inputs, full disks give one clear error."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megamoe.atomic import atomic_torch_save
from megamoe.checkpoint.integrity import (MANIFEST_NAME, CheckpointError, NonFiniteWeightsError, check_torch_file,
                                          list_files, numpy_load, read_json, torch_load, verify_directory,
                                          write_manifest)
from megamoe.checkpoint.staged import (BusyError, DirLock, StagedDirectory, check_output_path, recover,
                                       recover_root, remove_stale_legacy, remove_tree)

ROOT = Path(__file__).resolve().parents[2]


def _make(directory: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    return directory


FILES = {"a.bin": os.urandom(3000), "sub/b.bin": os.urandom(100), "c.json": b'{"manifest": 1}'}


def _sealed(tmp_path: Path, name: str = "ck") -> Path:
    d = _make(tmp_path / name, FILES)
    write_manifest(d)
    return d


# ------------------------------------------------------------------ manifests
def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = _sealed(tmp_path)
    doc = json.loads((d / MANIFEST_NAME).read_text())
    assert sorted(doc["files"]) == ["a.bin", "c.json", "sub/b.bin"] and doc["algorithm"] == "sha256"
    result = verify_directory(d, marker="c.json")
    assert result.verified and result.num_files == 3 and result.num_bytes == sum(map(len, FILES.values()))


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"x")


DAMAGE = {"truncate": (_truncate, "truncated"), "flip": (_flip, "does not match its sha256"),
          "delete": (Path.unlink, "is missing"), "append": (_append, "overwritten or appended")}


@pytest.mark.parametrize("rel", sorted(FILES))
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_any_damage_to_any_file_is_named(tmp_path, rel, damage):
    d = _sealed(tmp_path)
    fn, words = DAMAGE[damage]
    fn(d / rel)
    with pytest.raises(CheckpointError, match=words) as err:
        verify_directory(d, marker="c.json")
    assert err.value.path == str(d / rel)
    assert "use another checkpoint" in str(err.value)


def test_a_damaged_or_deleted_manifest_is_named(tmp_path):
    d = _sealed(tmp_path)
    (d / MANIFEST_NAME).write_text((d / MANIFEST_NAME).read_text()[:40])
    with pytest.raises(CheckpointError, match="is not valid JSON") as err:
        verify_directory(d)
    assert err.value.path == str(d / MANIFEST_NAME)
    (d / MANIFEST_NAME).unlink()
    # The marker says the directory was sealed: a missing manifest is damage, not an old format.
    with pytest.raises(CheckpointError, match="is missing, but c.json says"):
        verify_directory(d, marker="c.json")


def test_a_directory_from_before_manifests_is_accepted_unverified(tmp_path):
    d = _make(tmp_path / "old", {"a.bin": b"123", "c.json": b"{}"})
    result = verify_directory(d, marker="c.json")
    assert not result.verified


def test_nested_manifest_is_followed_and_each_byte_hashed_once(tmp_path):
    outer = _make(tmp_path / "outer", {"x.bin": b"outer"})
    inner = _sealed(outer, "engine")
    write_manifest(outer)
    assert list_files(outer) == [f"engine/{MANIFEST_NAME}", "x.bin"]
    assert verify_directory(outer).num_files == 5  # x.bin, the inner manifest and its 3 files
    _flip(inner / "sub" / "b.bin")
    with pytest.raises(CheckpointError) as err:
        verify_directory(outer)
    assert err.value.path == str(inner / "sub" / "b.bin")
    (inner / MANIFEST_NAME).write_text("{}")
    with pytest.raises(CheckpointError, match="is .* bytes, the manifest says") as err:
        verify_directory(outer)
    assert err.value.path == str(inner / MANIFEST_NAME)


# ------------------------------------------------------------------ named readers
def test_named_readers(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match=r"bad.json: is not valid JSON .*truncated or corrupt"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match="is not UTF-8"):
        read_json(tmp_path / "latin.json")
    atomic_torch_save({"w": torch.randn(1000)}, tmp_path / "t.pt")
    check_torch_file(tmp_path / "t.pt")
    _flip(tmp_path / "t.pt")  # inside the tensor data: torch.load alone would not notice
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        check_torch_file(tmp_path / "t.pt")
    _truncate(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t.pt: cannot be read by torch.load .*truncated or corrupt"):
        torch_load(tmp_path / "t.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="missing.pt: is missing"):
        torch_load(tmp_path / "missing.pt")
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CheckpointError, match="clear the cache"):
        numpy_load(tmp_path / "a.npy", advice="clear the cache")


# ------------------------------------------------------------------ the staged protocol
def test_staged_directory_publishes_sealed_and_replaces_by_swap(tmp_path):
    final = tmp_path / "out"
    with StagedDirectory(final) as st:
        assert st.payload.name == "out" and not final.exists()
        (st.payload / "f.txt").write_text("one")
    assert (final / "f.txt").read_text() == "one" and verify_directory(final).verified
    with StagedDirectory(final) as st:
        (st.payload / "f.txt").write_text("two")
        assert (final / "f.txt").read_text() == "one"  # the old copy stays until the swap
    assert (final / "f.txt").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging, old or lock left


def test_published_files_get_the_umask_mode_whatever_their_writer_gave_them(tmp_path):
    """safetensors and mkstemp create files 0600: a shared checkpoint folder must stay readable by
    the group/others the umask allows; an executable keeps its execute bits."""
    mask = os.umask(0o022)
    os.umask(mask)
    final = tmp_path / "out"
    with StagedDirectory(final) as st:
        for name, mode in (("weights.bin", 0o600), ("run.sh", 0o700), ("sub/meta.json", 0o640)):
            (st.payload / name).parent.mkdir(exist_ok=True)
            (st.payload / name).write_text(name)
            os.chmod(st.payload / name, mode)
    assert (final / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (final / "sub" / "meta.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (final / "run.sh").stat().st_mode & 0o777 == 0o777 & ~mask
    assert verify_directory(final).verified


def test_a_failed_or_abandoned_write_leaves_everything_as_it_was(tmp_path):
    final = _sealed(tmp_path, "out")
    with pytest.raises(RuntimeError, match="boom"):
        with StagedDirectory(final) as st:
            (st.payload / "a.bin").write_text("half")
            raise RuntimeError("boom")
    with StagedDirectory(final) as st:
        st.abandon()
    assert sorted(os.listdir(tmp_path)) == ["out"] and verify_directory(final).verified


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    final = tmp_path / "out"
    with StagedDirectory(final):
        with pytest.raises(BusyError, match="another megamoe process is writing"):
            with StagedDirectory(final):
                pass
        with pytest.raises(BusyError):
            recover_root(tmp_path, busy="raise")
        recover_root(tmp_path, busy="skip")  # a live writer's files are left alone
        assert (tmp_path / ".out.staging" / "out").is_dir()


def _state(tmp_path: Path, *, final: str | None, staged: str | None, sealed: bool, old: str | None) -> Path:
    """Lay out one state a kill can leave: FINAL, the staged copy (sealed or not) and .old."""
    root = tmp_path / "ckpts"
    root.mkdir()
    copies = [(root / "step", final, True), (root / ".step.staging" / "step", staged, sealed),
              (root / ".step.old", old, True)]
    for path, content, seal in copies:
        if content is not None:
            _make(path, {"w.bin": content.encode() * 100})
            if seal:
                write_manifest(path)
    (root / ".step.lock").write_text("")  # the dead writer's lock file (its flock died with it)
    return root


# (name, final, staged copy, sealed, old) -> the content FINAL must hold after recovery.
KILL_STATES = [
    ("created: empty staged copy", "A", "", False, None, "A"),
    ("filled: staged copy unsealed", "A", "B", False, None, "A"),
    ("first save, unsealed", None, "B", False, None, None),
    ("sealed, not yet swapped", "A", "B", True, None, "B"),
    ("first save, sealed", None, "B", True, None, "B"),
    ("old moved aside", None, "B", True, "A", "B"),
    ("renamed in, old not yet removed", "B", None, False, "A", "B"),
    ("old removed, staging folder left", "B", None, False, None, "B"),
    ("only old left (manual)", None, None, False, "A", "A"),
]


@pytest.mark.parametrize("name,final,staged,sealed,old,want", KILL_STATES, ids=[s[0] for s in KILL_STATES])
def test_recovery_of_every_state_a_kill_can_leave(tmp_path, name, final, staged, sealed, old, want):
    root = _state(tmp_path, final=final, staged=staged, sealed=sealed, old=old)
    complete_before = [c for c, ok in ((final, True), (staged, sealed), (old, True)) if c is not None and ok]
    assert (want is None) == (not complete_before)  # the states the protocol can reach keep a complete copy
    recover_root(root, busy="raise")
    assert sorted(os.listdir(root)) == ([] if want is None else ["step"])
    if want is not None:
        assert (root / "step" / "w.bin").read_text() == want * 100
        assert verify_directory(root / "step").verified


def test_remove_tree_never_leaves_a_half_deleted_directory_under_its_name(tmp_path):
    d = _sealed(tmp_path, "step")
    (tmp_path / ".step.deleting").mkdir()  # an earlier interrupted removal
    remove_tree(d)
    assert os.listdir(tmp_path) == []
    (tmp_path / ".other.deleting").mkdir()
    recover_root(tmp_path)
    assert os.listdir(tmp_path) == []


def test_legacy_temporaries_are_removed_only_when_stale(tmp_path):
    for name in (".prep-old", ".prep-new", ".hf.tmp-old", "data"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    past = time.time() - 7200
    for name in (".prep-old", ".hf.tmp-old"):
        os.utime(tmp_path / name / "f", (past, past))
        os.utime(tmp_path / name, (past, past))
    assert remove_stale_legacy(tmp_path, (".prep-", ".hf.tmp-")) == [".hf.tmp-old", ".prep-old"]
    assert sorted(os.listdir(tmp_path)) == [".prep-new", "data"]  # maybe a live older megamoe: kept


def test_older_atomic_dir_leftover_holding_the_only_copy_is_restored(tmp_path):
    # The old atomic_dir moved OUT into .OUT.old-XXXX/x, then was killed before renaming its new copy in.
    _make(tmp_path / ".out.old-abc" / "x", {"f": b"only copy"})
    _make(tmp_path / ".out.tmp-def", {"f": b"new, maybe partial"})
    recover(tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == b"only copy"


def test_lock_is_free_again_after_its_holder_dies(tmp_path):
    lock = tmp_path / ".x.lock"
    code = f"from megamoe.checkpoint.staged import DirLock; import os; DirLock.acquire({str(lock)!r}); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert lock.exists()  # the file stays, the flock died with the process
    held = DirLock.try_acquire(lock)
    assert held is not None
    held.release()
    assert not lock.exists()


# ------------------------------------------------------------------ output paths
def _paths(tmp_path):
    src = _make(tmp_path / "run" / "ckpt", {"f": b"1"})
    (tmp_path / "link").symlink_to(src)
    (tmp_path / "afile").write_text("x")
    return src


# (OUT relative to tmp_path, inputs, error or None)
OUTPUTS = [
    ("run/ckpt", "is the input"),
    ("link", "is the input"),  # a symlink to the source
    ("run", "contains the input"),
    ("run/ckpt/hf", "lies inside the input"),
    ("link/hf", "lies inside the input"),
    ("afile/out", "is a file, not a directory"),
    ("afile/a/b", "is a file, not a directory"),
    ("afile", "exists and is a file"),
    ("elsewhere/hf", None),
    ("run/hf", None),  # a sibling of the source is fine
]


@pytest.mark.parametrize("out,error", OUTPUTS, ids=[o for o, _ in OUTPUTS])
def test_outputs_never_overlap_inputs_or_sit_under_files(tmp_path, out, error):
    src = _paths(tmp_path)
    if error is None:
        assert check_output_path(tmp_path / out, inputs=[src]) == tmp_path / out
    else:
        with pytest.raises(ValueError, match=error):
            check_output_path(tmp_path / out, inputs=[src])


# ------------------------------------------------------------------ full disks
def _with_file_size_limit(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` under RLIMIT_FSIZE: writes past ``limit`` bytes fail with EFBIG, as on a full disk."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_a_full_disk_is_one_clear_error_and_leaves_nothing_half_written(tmp_path):
    _sealed(tmp_path, "ck")
    code = f"""
        import torch
        from pathlib import Path
        from megamoe.atomic import atomic_torch_save, OutOfSpaceError
        from megamoe.checkpoint.staged import StagedDirectory
        from safetensors.torch import save_file
        big = {{"w": torch.zeros(100_000)}}
        for name, write in [("single.pt", lambda d: atomic_torch_save(big, d / "single.pt")),
                            ("ck", None)]:
            try:
                if write is not None:
                    write(Path({str(tmp_path)!r}))
                else:
                    with StagedDirectory(Path({str(tmp_path)!r}) / "ck") as st:
                        save_file(big, str(st.payload / "w.safetensors"))
            except OutOfSpaceError as exc:
                print("ERR", name, exc)
    """
    proc = _with_file_size_limit(code, 50_000, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("the disk is full, over quota or at a file size limit" in l for l in lines)
    assert str(tmp_path / "single.pt") in lines[0] and str(tmp_path / "ck") in lines[1]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp file, staging folder or lock left
    assert verify_directory(tmp_path / "ck").verified  # the earlier copy is untouched


# ------------------------------------------------------------------ non-finite weights
def test_consolidated_save_refuses_nonfinite_weights_naming_them(tmp_path):
    from megamoe.checkpoint import save_consolidated
    from megamoe.model import ModelConfig, MoETransformerLM
    from megamoe.config import ExpertConfig, MoEConfig, RouterConfig

    cfg = ModelConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=16,
                      moe=MoEConfig(num_experts=2, experts=ExpertConfig(intermediate_size=8),
                                    router=RouterConfig(top_k=1)))
    model = MoETransformerLM(cfg)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "down_proj" in n)[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"down_proj \(1 values\).*Nothing was written"):
        save_consolidated(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []
