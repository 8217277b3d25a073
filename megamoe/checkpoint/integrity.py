"""Checkpoint integrity: sha256 manifests, named errors for unreadable files, finite weights.

Every directory megamoe writes through :mod:`megamoe.checkpoint.staged` (training checkpoints
of both backends, DeepSpeed engine checkpoints, consolidated model directories, HF exports,
the data cache) is sealed by ``megamoe_manifest.json``, written last::

    {"format": 1, "algorithm": "sha256",
     "files": {"model.safetensors": {"size": 200392, "sha256": "9f2c..."}, ...}}

``files`` lists every regular file by its path relative to the directory. A subdirectory
sealed by a manifest of its own (the DeepSpeed engine folder inside a training checkpoint) is
listed by that manifest file only; verification follows it, so each byte is hashed once.

Readers call :func:`verify_directory` before loading anything. A manifest that is present
must match exactly (missing, resized or changed files raise :class:`CheckpointError` naming
the file). A directory without a manifest is accepted *unverified* (the caller warns) unless
its marker JSON (``megamoe_config.json``, ``megamoe/meta.json``, the cache's ``meta.json``)
carries the ``"manifest"`` key that writers since manifests add: then the manifest was
deleted and the directory is refused. Directories written before manifests existed therefore
still load, with a warning.

Verifying reads every file once (sha256 runs at about 1-2 GB/s per core); under
torch.distributed, :func:`verify_directory` with ``collective=True`` splits the files over
the ranks.

Also here: :class:`CheckpointError` readers that name the file they fail on
(:func:`read_json`, :func:`torch_load`, :func:`load_safetensors`, :func:`numpy_load`), a
zip CRC check for single ``torch.save`` files (:func:`check_torch_file`), and the non-finite
weight check every checkpoint writer runs first (:func:`check_finite`).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

MANIFEST_NAME = "megamoe_manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_KEY = "manifest"  # set in a directory's marker JSON: the directory is sealed by a manifest
_CHUNK = 1 << 20

ANOTHER_CHECKPOINT = "use another checkpoint (or restore this file from a copy)"


class CheckpointError(ValueError):
    """A file of a checkpoint (or cache) is missing, unreadable or not what was written.

    ``path`` is the file (or directory) at fault; the message says what is wrong and what to do.
    """

    def __init__(self, path: str | os.PathLike, problem: str, advice: str = ANOTHER_CHECKPOINT) -> None:
        self.path, self.problem, self.advice = str(path), problem, advice
        super().__init__(f"{path}: {problem}" + (f"; {advice}" if advice else ""))


class NonFiniteWeightsError(ValueError):
    """Weights hold NaN or inf: nothing was written (the message names the tensors)."""


# ----------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_directory` found: ``verified`` is False for a directory without a
    manifest written before manifests existed (loaded unverified)."""

    directory: str
    verified: bool
    num_files: int = 0
    num_bytes: int = 0


def hash_file(path: str | os.PathLike, *, fsync: bool = False) -> FileRecord:
    """Size and sha256 of a file; ``fsync=True`` also flushes it to stable storage (writers
    seal a directory only once its files are durable)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return FileRecord(size=size, sha256=h.hexdigest())


def list_files(directory: str | os.PathLike) -> list[str]:
    """Relative paths (with ``/``) of the files a manifest of ``directory`` lists, sorted:
    every regular file except the manifest itself; a sealed subdirectory contributes only
    its manifest. Symlinks are refused (a manifest describes bytes, not links)."""
    root = Path(directory)
    out: list[str] = []

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            name = f"{rel}{entry.name}"
            if entry.is_symlink():
                raise CheckpointError(d / entry.name, "is a symbolic link; checkpoint directories hold plain files",
                                      "replace the link by the file it points to")
            if entry.is_dir():
                if (Path(entry.path) / MANIFEST_NAME).is_file():
                    out.append(f"{name}/{MANIFEST_NAME}")
                else:
                    walk(Path(entry.path), f"{name}/")
            elif entry.is_file() and name != MANIFEST_NAME:
                out.append(name)

    walk(root, "")
    return out


def manifest_document(records: Mapping[str, FileRecord]) -> str:
    files = {k: {"size": r.size, "sha256": r.sha256} for k, r in sorted(records.items())}
    return json.dumps({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, indent=1) + "\n"


def write_manifest(directory: str | os.PathLike, records: Mapping[str, FileRecord] | None = None) -> Path:
    """Seal ``directory``: write its manifest (atomically, fsynced) from ``records``, or from
    hashing every file of :func:`list_files` (each fsynced) when ``records`` is None."""
    from megamoe.atomic import atomic_write_text

    root = Path(directory)
    if records is None:
        records = {rel: hash_file(root / rel, fsync=True) for rel in list_files(root)}
    return atomic_write_text(root / MANIFEST_NAME, manifest_document(records))


def read_manifest(directory: str | os.PathLike, *, advice: str = ANOTHER_CHECKPOINT) -> dict[str, FileRecord] | None:
    """The records of ``directory``'s manifest, or None when it has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    data = read_json(path, advice=advice)
    try:
        if data.get("format") != MANIFEST_FORMAT or data.get("algorithm") != "sha256":
            raise CheckpointError(path, f"unknown manifest format {data.get('format')!r} / algorithm "
                                        f"{data.get('algorithm')!r} (this megamoe reads format {MANIFEST_FORMAT}, "
                                        "sha256)", "update megamoe, or " + advice)
        return {str(k): FileRecord(size=int(v["size"]), sha256=str(v["sha256"])) for k, v in data["files"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"is not a valid manifest ({type(exc).__name__}: {exc})", advice) from exc


def _expected_files(directory: Path, advice: str) -> dict[str, FileRecord] | None:
    """Every file the manifest (and the sealed subdirectories it lists) promises, flattened."""
    records = read_manifest(directory, advice=advice)
    if records is None:
        return None
    out = dict(records)
    for rel, rec in records.items():
        if rel.endswith("/" + MANIFEST_NAME):
            sub = directory / rel
            problem = _check_one(sub, rec)  # a nested manifest must be intact before it is trusted
            if problem:
                raise CheckpointError(sub, problem, advice)
            nested = _expected_files(sub.parent, advice) or {}
            prefix = rel[: -len(MANIFEST_NAME)]
            out.update({prefix + k: v for k, v in nested.items()})
    return out


def _check_one(path: Path, rec: FileRecord) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing (the manifest lists it)"
    except NotADirectoryError:
        return "is missing (a parent folder is a file)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size != rec.size:
        return (f"is {size} bytes, the manifest says {rec.size} "
                f"({'truncated' if size < rec.size else 'overwritten or appended to'} after it was written)")
    try:
        digest = hash_file(path).sha256
    except OSError as exc:  # unreadable (permissions, I/O error): a problem to report, not a crash on one rank
        return f"cannot be read ({exc.strerror or exc})"
    if digest != rec.sha256:
        return "does not match its sha256 in the manifest (its contents changed after it was written)"
    return None


def _marker_requires_manifest(directory: Path, marker: str | None) -> bool:
    if marker is None:
        return False
    path = directory / marker
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: the load that follows names it
    return isinstance(data, dict) and MANIFEST_KEY in data


def verify_directory(directory: str | os.PathLike, *, marker: str | None = None, advice: str = ANOTHER_CHECKPOINT,
                     collective: bool = False) -> Verification:
    """Check every file of ``directory`` against its manifest; raise :class:`CheckpointError`
    naming the first bad file (all of them in the message when several are bad).

    ``marker``: the directory's JSON that records whether it was sealed (see the module
    docstring). ``collective``: every rank of the default process group calls this; each
    hashes a share of the files and all ranks raise or return together.
    """
    import torch.distributed as dist

    root = Path(directory)
    together = collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if together else (0, 1)
    problems: list[tuple[str, str]] = []
    expected: dict[str, FileRecord] | None = None
    early: CheckpointError | None = None
    try:
        if not root.is_dir():
            raise CheckpointError(root, "is not a directory" if root.exists() else "does not exist", advice)
        expected = _expected_files(root, advice)
        if expected is None and _marker_requires_manifest(root, marker):
            raise CheckpointError(root / MANIFEST_NAME, f"is missing, but {marker} says the directory was sealed by "
                                                        "one (deleted, or the directory is incomplete)", advice)
        for i, (rel, rec) in enumerate(sorted((expected or {}).items())):
            if i % world == rank:
                problem = _check_one(root / rel, rec)
                if problem:
                    problems.append((rel, problem))
    except CheckpointError as exc:
        early = exc
    if together:
        gathered: list[Any] = [None] * world
        mine = (early.path, early.problem, early.advice) if early else None
        dist.all_gather_object(gathered, (mine, problems))
        firsts = [e for e, _ in gathered if e]
        if firsts and early is None:
            early = CheckpointError(*firsts[0])
        problems = sorted(p for _, ps in gathered for p in ps)
    if early is not None:
        raise early
    if problems:
        first_rel, first_problem = problems[0]
        more = "".join(f"; {rel} {p}" for rel, p in problems[1:4])
        extra = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CheckpointError(root / first_rel, first_problem + more + extra, advice)
    if expected is None:
        return Verification(str(root), verified=False)
    return Verification(str(root), verified=True, num_files=len(expected),
                        num_bytes=sum(r.size for r in expected.values()))


def unverified_warning(directory: str | os.PathLike) -> str:
    return (f"{directory} has no {MANIFEST_NAME} (written by a megamoe without checkpoint checksums); "
            "loading it unverified")


# ----------------------------------------------------------------------------- named readers
def read_json(path: str | os.PathLike, *, advice: str = ANOTHER_CHECKPOINT) -> Any:
    """``json.load`` of ``path``, raising :class:`CheckpointError` naming it when it is
    missing, not UTF-8 or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, "is missing", advice) from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start}): corrupt",
                              advice) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                                    "truncated or corrupt", advice) from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a JSON file", advice) from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})", advice) from None


def check_torch_file(path: str | os.PathLike, *, advice: str = ANOTHER_CHECKPOINT) -> None:
    """Check a ``torch.save`` file's zip CRC32s (torch writes one per stored record), which
    catches truncation and changed bytes in single files that no manifest covers."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except FileNotFoundError:
        raise CheckpointError(path, "is missing", advice) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(path, f"is not a readable torch.save archive ({exc}): truncated or corrupt",
                              advice) from None
    if bad is not None:
        raise CheckpointError(path, f"record {bad!r} fails its CRC check: the file changed after it was written",
                              advice)


def torch_load(path: str | os.PathLike, *, advice: str = ANOTHER_CHECKPOINT, **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)``, raising :class:`CheckpointError` naming ``path`` when
    it is missing, truncated or corrupt."""
    import pickle

    import torch

    if not os.path.exists(path):
        raise CheckpointError(path, "is missing", advice)
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, UnicodeDecodeError, ValueError, KeyError,
            AttributeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"cannot be read by torch.load ({type(exc).__name__}: {str(exc)[:200]}): "
                                    "truncated or corrupt", advice) from exc


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu", advice: str = ANOTHER_CHECKPOINT) -> dict:
    """``safetensors.torch.load_file``, raising :class:`CheckpointError` naming ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise CheckpointError(path, "is missing", advice)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"is not a readable safetensors file ({str(exc)[:200]}): truncated or corrupt",
                              advice) from exc


def load_safetensors_model(model: Any, path: str | os.PathLike, *, device: str = "cpu",
                           advice: str = ANOTHER_CHECKPOINT) -> None:
    """``safetensors.torch.load_model`` (strict; restores tied weights), raising
    :class:`CheckpointError` naming ``path`` when the file is unreadable or does not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not os.path.exists(path):
        raise CheckpointError(path, "is missing", advice)
    try:
        load_model(model, str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(path, f"is not a readable safetensors file ({str(exc)[:200]}): truncated or corrupt",
                              advice) from exc
    except RuntimeError as exc:  # missing / unexpected keys or shapes
        raise CheckpointError(path, f"does not match the model ({str(exc)[:300]})", advice) from exc


def numpy_load(path: str | os.PathLike, *, advice: str) -> Any:
    """``numpy.load`` (no pickles), raising :class:`CheckpointError` naming ``path``."""
    import numpy as np

    if not os.path.exists(path):
        raise CheckpointError(path, "is missing", advice)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CheckpointError(path, f"is not a readable .npy array ({str(exc)[:200]}): truncated or corrupt",
                              advice) from exc


# ----------------------------------------------------------------------------- finite weights
def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[tuple[str, int]]:
    """(name, number of NaN/inf elements) of each floating-point tensor that has any."""
    import torch

    out = []
    for name, t in named:
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                out.append((name, bad))
    return out


def nonfinite_message(bad: list[tuple[str, int]], *, what: str) -> str:
    listed = ", ".join(f"{n} ({k} values)" for n, k in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    return (f"refusing to write {what}: {len(bad)} weight tensor(s) hold NaN or inf: {listed}. Nothing was written; "
            "the earlier checkpoints are intact (lower the learning rate, or enable gradient clipping, and resume "
            "from the last good checkpoint)")


def check_finite(named: Iterable[tuple[str, Any]], *, what: str) -> None:
    """Before a write: raise :class:`NonFiniteWeightsError` naming the tensors of ``named``
    that hold NaN/inf."""
    bad = nonfinite_tensors(named)
    if bad:
        raise NonFiniteWeightsError(nonfinite_message(bad, what=what))


def check_loaded_finite(named: Iterable[tuple[str, Any]], path: str | os.PathLike,
                        *, advice: str = ANOTHER_CHECKPOINT) -> None:
    """After a read: raise :class:`CheckpointError` naming ``path`` when loaded weights hold
    NaN or inf (damage in a file that no manifest covers, or one written before manifests)."""
    bad = nonfinite_tensors(named)
    if bad:
        listed = ", ".join(f"{n} ({k} values)" for n, k in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6
                                                                         else "")
        raise CheckpointError(path, f"holds NaN or inf in {len(bad)} weight tensor(s): {listed}", advice)


__all__ = ["MANIFEST_NAME", "MANIFEST_KEY", "CheckpointError", "NonFiniteWeightsError", "FileRecord", "Verification",
           "hash_file", "list_files", "write_manifest", "read_manifest", "verify_directory", "unverified_warning",
           "read_json", "check_torch_file", "torch_load", "load_safetensors", "load_safetensors_model", "numpy_load", "nonfinite_tensors",
           "nonfinite_message", "check_finite", "check_loaded_finite", "ANOTHER_CHECKPOINT"]
