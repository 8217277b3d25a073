"""Staged directories: write a directory beside its final place, seal it, then swap it in.

Every directory megamoe writes as a unit goes through :class:`StagedDirectory`: training
checkpoints (torch and DeepSpeed backends, every rank's files), DeepSpeed engine
checkpoints, consolidated model directories, HF exports and the tokenised data cache. For
``FINAL = <root>/<name>`` the protocol is:

1. lock     ``<root>/.<name>.lock`` is held (``flock``) by the writing process throughout;
2. stage    the files are written into ``<root>/.<name>.staging/<name>`` (every rank writes
            its own files there under ``collective=True``);
3. seal     ``megamoe_manifest.json`` (size and sha256 of every file, each fsynced first) is
            written last: from here on the staged copy is complete;
4. publish  an existing FINAL is renamed to ``<root>/.<name>.old``, the staged copy is renamed
            to FINAL, then ``.old`` is removed;
5. unlock   the empty ``.staging`` folder and the lock file are removed.

At every instant one complete copy is reachable: FINAL, the sealed staged copy, or ``.old``.
:func:`recover` (called under the lock by every writer and, for a whole folder, by
:func:`recover_root` at the start of a job) finishes what a killed writer left: a sealed
staged copy is published (roll forward), an unsealed one is removed, and ``.old`` is renamed
back when FINAL is missing or removed once FINAL is there. Names whose lock is held belong
to a live writer and are left alone (``flock`` locks die with their process, SIGKILL
included). Directories left by megamoe versions before this protocol (``.prep-*``,
``.<name>.tmp-*``, ``.<name>.old-*``) are removed once untouched for an hour
(:data:`LEGACY_STALE_S`), after restoring a moved-aside copy whose FINAL is missing.

``MEGAMOE_CRASH_AT=<point>`` makes the process ``os._exit`` at one named point of the
protocol, as a kill would (no cleanup runs): the tests use it to prove that a complete copy
survives a kill between any two steps. The points, in order: ``stage.created``,
``save.partial`` (the trainer, between two of its files), ``stage.filled``, ``stage.sealed``,
``publish.moved_old``, ``publish.renamed``, ``publish.done``, ``save.latest``,
``save.rotated_one`` (the last two in the trainer).

Also here, for every command that writes an output from inputs, :func:`check_output_path`:
an output must not be, contain or lie inside an input, nor lie under a regular file. A write
cut short by a full disk becomes :class:`megamoe.atomic.OutOfSpaceError` naming FINAL.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from megamoe.atomic import give_usual_mode, out_of_space_error
from megamoe.checkpoint.integrity import MANIFEST_NAME, hash_file, list_files, write_manifest

CRASH_ENV = "MEGAMOE_CRASH_AT"
CRASH_EXIT_CODE = 86
LEGACY_STALE_S = 3600.0
_STAGING, _OLD, _LOCK, _DELETING = ".staging", ".old", ".lock", ".deleting"


def crash_point(name: str) -> None:
    """Test hook: end the process here (``os._exit``) when ``MEGAMOE_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


class BusyError(RuntimeError):
    """Another live process holds the lock of the directory being written."""


# ----------------------------------------------------------------------------- errors across ranks
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def agree(error: BaseException | None, *, collective: bool) -> None:
    """Make every rank raise when any rank failed (call it on every rank after a step that
    is not itself collective). The failed rank re-raises its own exception; the others
    raise RuntimeError naming it, so no rank is left waiting in a later collective."""
    dist = _dist() if collective else None
    if dist is None:
        if error is not None:
            raise error
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(gathered) if m is not None]
    if failed:
        rank, msg = failed[0]
        raise RuntimeError(f"rank {rank} failed: {msg}")


def run_agreed(fn: Callable[[], Any], *, collective: bool) -> Any:
    """``fn()`` on this rank, then :func:`agree`: every rank raises if any rank's ``fn`` raised."""
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised by agree() on this rank
        agree(exc, collective=collective)
        raise
    agree(None, collective=collective)
    return result


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def _barrier(collective: bool) -> None:
    dist = _dist() if collective else None
    if dist is not None:
        dist.barrier()


# ----------------------------------------------------------------------------- locks
class DirLock:
    """An exclusive ``flock`` on ``path`` (created if needed, removed on release).

    ``acquire(wait=False)`` raises :class:`BusyError` when a live process holds it. On a file
    system without ``flock`` the writer proceeds unlocked and cleaners treat the name as busy.
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: Path, *, wait: bool = False, what: str = "") -> "DirLock":
        import fcntl

        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise BusyError(f"another megamoe process is writing {what or path} right now (it holds {path}); "
                                "wait for it to finish, or stop it") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                return cls(path, fd)  # no locking here: proceed, cleaners will see a busy name
            # The previous holder may have removed the file between our open and flock: retry.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return cls(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)

    @classmethod
    def try_acquire(cls, path: Path) -> "DirLock | None":
        """The lock if it is free (or absent), else None."""
        try:
            return cls.acquire(path, wait=False)
        except BusyError:
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


# ----------------------------------------------------------------------------- protocol pieces
def _names(final: Path) -> tuple[Path, Path, Path, Path]:
    """(container, staged copy, old, lock) of ``final``."""
    root, name = final.parent, final.name
    container = root / f".{name}{_STAGING}"
    return container, container / name, root / f".{name}{_OLD}", root / f".{name}{_LOCK}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def is_sealed(directory: str | os.PathLike) -> bool:
    """True when ``directory`` carries its manifest (written last, so its files are complete)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def seal(payload: Path, *, collective: bool = False) -> None:
    """Write ``payload``'s manifest last. Collective: every rank hashes (and fsyncs) a share of
    the files it can see, rank 0 writes the manifest."""
    dist = _dist() if collective else None
    if dist is None:
        for rel in list_files(payload):
            give_usual_mode(payload / rel)
        write_manifest(payload)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: list[Any] = [None] * world
    listing = run_agreed(lambda: list_files(payload), collective=True)
    dist.all_gather_object(seen, listing)
    files = sorted(set().union(*seen))
    def share() -> dict[str, Any]:
        for rel in files[rank::world]:
            give_usual_mode(payload / rel)
        return {rel: hash_file(payload / rel, fsync=True) for rel in files[rank::world]}

    records = run_agreed(share, collective=True)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, records)
    merged = {k: v for part in parts for k, v in part.items()}
    run_agreed(lambda: write_manifest(payload, merged) if rank == 0 else None, collective=True)


def publish(payload: Path, final: Path) -> None:
    """Swap the sealed ``payload`` in as ``final`` (see the module docstring, step 4)."""
    _, _, old, _ = _names(final)
    if os.path.lexists(final):
        if os.path.lexists(old):
            _rmtree(old)  # a stale copy from an earlier publish: FINAL and payload are both complete
        os.replace(final, old)
        crash_point("publish.moved_old")
    os.replace(payload, final)
    _fsync_dir(final.parent)
    crash_point("publish.renamed")
    if os.path.lexists(old):
        _rmtree(old)
    crash_point("publish.done")


def recover(final: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> None:
    """Finish or undo an interrupted write of ``final``; the caller holds its lock."""
    final = Path(final)
    container, payload, old, _ = _names(final)
    if payload.is_dir() and is_sealed(payload):
        publish(payload, final)
        if log:
            log(f"recovered {final} from its sealed staged copy (the writer was interrupted while publishing it)")
    elif not os.path.lexists(final) and os.path.lexists(old):
        os.replace(old, final)
        if log:
            log(f"restored {final} from {old.name} (the writer was interrupted while replacing it)")
    elif os.path.lexists(old):
        _rmtree(old)
    if os.path.lexists(container):
        _rmtree(container)
    _recover_legacy(final, log=log)


def _newest_mtime(path: Path) -> float:
    newest = os.lstat(path).st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def remove_stale_legacy(root: str | os.PathLike, prefixes: Iterable[str], *, older_than_s: float = LEGACY_STALE_S,
                        log: Callable[[str], None] | None = None) -> list[str]:
    """Remove entries of ``root`` whose names start with one of ``prefixes`` (temporary names
    of older megamoe versions) once nothing in them changed for ``older_than_s``."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in sorted(os.listdir(root)):
        if not any(entry.startswith(p) for p in prefixes):
            continue
        path = root / entry
        try:
            if now - _newest_mtime(path) < older_than_s:
                continue
            _rmtree(path)
        except FileNotFoundError:
            continue
        removed.append(entry)
        if log:
            log(f"removed {path}, left by an interrupted write")
    return removed


def _recover_legacy(final: Path, *, log: Callable[[str], None] | None) -> None:
    # Older atomic_dir moved FINAL to .<name>.old-XXXX/x before renaming .<name>.tmp-XXXX in:
    # a kill between the two left FINAL missing and its only copy in .old-*/x.
    root, name = final.parent, final.name
    if not root.is_dir():
        return
    if not os.path.lexists(final):
        for entry in sorted(os.listdir(root)):
            if entry.startswith(f".{name}.old-") and os.path.lexists(root / entry / "x"):
                os.replace(root / entry / "x", final)
                if log:
                    log(f"restored {final} from {entry}/x (left by an interrupted write)")
                break
    remove_stale_legacy(root, (f".{name}.tmp-", f".{name}.old-"), log=log)


def promote_legacy_staging(root: str | os.PathLike, *, prefix: str, complete: Callable[[str], bool],
                           log: Callable[[str], None] | None = None) -> None:
    """Directories an older megamoe staged in ``root`` as ``.tmp-<name>`` before this protocol
    existed (those whose name starts with ``prefix``, itself starting with ``.tmp-``): one that
    ``complete(path)`` accepts becomes ``<name>`` when that name is free; the others are removed."""
    if not prefix.startswith(".tmp-"):
        raise ValueError(f"prefix={prefix!r} is invalid: legacy staging names start with '.tmp-'")
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(os.listdir(root)):
        if not entry.startswith(prefix):
            continue
        tmp, final = root / entry, root / entry[len(".tmp-"):]
        if complete(str(tmp)) and not os.path.lexists(final):
            os.replace(tmp, final)
            if log:
                log(f"recovered {final} from {entry} (a directory an older megamoe was interrupted replacing)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its
    name: it is renamed to ``.<name>.deleting`` first (removed by :func:`recover_root`)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = path.parent / f".{path.name}{_DELETING}"
    if os.path.lexists(trash):
        _rmtree(trash)
    os.replace(path, trash)
    _rmtree(trash)


def recover_root(root: str | os.PathLike, *, busy: str = "skip", log: Callable[[str], None] | None = None) -> None:
    """:func:`recover` every name of ``root`` that has protocol leftovers (staging, old or
    lock entries) and no live writer, and finish interrupted :func:`remove_tree` calls.
    ``busy``: "skip" names a live writer holds, or "raise" :class:`BusyError`."""
    root = Path(root)
    if not root.is_dir():
        return
    names = set()
    for entry in os.listdir(root):
        if entry.startswith(".") and entry.endswith(_DELETING):
            _rmtree(root / entry)
            continue
        for suffix in (_STAGING, _OLD, _LOCK):
            if entry.startswith(".") and entry.endswith(suffix) and len(entry) > len(suffix) + 1:
                names.add(entry[1:-len(suffix)])
    for name in sorted(names):
        final = root / name
        lock = DirLock.try_acquire(_names(final)[3])
        if lock is None:
            if busy == "raise":
                raise BusyError(f"another megamoe process is writing {final} right now (it holds "
                                f"{_names(final)[3]}); stop it, or use another directory")
            continue
        try:
            recover(final, log=log)
        finally:
            lock.release()


# ----------------------------------------------------------------------------- the writer
class StagedDirectory:
    """Write ``final`` through the staged protocol (module docstring)::

        with StagedDirectory(path) as st:
            write_files_into(st.payload)
        # sealed and published here; on an exception nothing changed at ``path``

    ``collective=True``: every rank of the default process group enters and leaves it; rank
    0 locks, creates, publishes and cleans up, every rank writes its own files into
    ``payload`` and hashes a share of them. The body must raise on every rank or on none
    (use :func:`agree` after per-rank writes). ``wait``: wait for another writer's lock
    instead of raising :class:`BusyError`. Call :meth:`abandon` to leave without publishing.
    """

    def __init__(self, final: str | os.PathLike, *, collective: bool = False, wait: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.final = Path(os.path.abspath(final))
        self.container, self.payload, self.old, self.lock_path = _names(self.final)
        self.collective, self.wait, self.log = collective, wait, log
        self._writer = not collective or _rank() == 0
        self._lock: DirLock | None = None
        self._abandoned = False

    def __enter__(self) -> "StagedDirectory":
        def start() -> None:
            if not self._writer:
                return
            check_output_path(self.final, what="output directory")
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock = DirLock.acquire(self.lock_path, wait=self.wait, what=str(self.final))
            try:
                recover(self.final, log=self.log)
                self.payload.mkdir(parents=True)
            except BaseException:
                self._release()
                raise

        run_agreed(start, collective=self.collective)
        _barrier(self.collective)
        crash_point("stage.created")
        return self

    def abandon(self) -> None:
        """Leave the ``with`` block without publishing (the staged copy is removed)."""
        self._abandoned = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None or self._abandoned:
            if self._writer:
                self._release()
            if exc is not None:  # name the directory, not the staged file
                translated = out_of_space_error(exc, self.final)
                if translated is not None:
                    raise translated from exc
            return False
        crash_point("stage.filled")
        try:
            seal(self.payload, collective=self.collective)
        except BaseException as err:
            if self._writer:
                self._release()
            translated = out_of_space_error(err, self.final)
            if translated is not None:
                raise translated from err
            raise
        crash_point("stage.sealed")

        def finish() -> None:
            if self._writer:
                try:
                    publish(self.payload, self.final)
                finally:
                    self._release()

        run_agreed(finish, collective=self.collective)
        _barrier(self.collective)
        return False

    def _release(self) -> None:
        try:
            if os.path.lexists(self.container):
                _rmtree(self.container)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def write_directory(out_dir: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create ``out_dir`` (one process) through the protocol: ``fill(path)`` writes the files into
    the staged copy, which is sealed and swapped in (an existing ``out_dir`` is replaced only with
    ``overwrite=True``). Returns ``out_dir`` made absolute."""
    out = Path(os.path.abspath(out_dir))
    check_output_path(out, what="output directory")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output directory {out} already exists; pass overwrite=True (CLI: --overwrite)")
    with StagedDirectory(out) as staged:
        if os.path.lexists(out) and not overwrite:  # published by an interrupted writer we just recovered
            raise FileExistsError(f"output directory {out} already exists; pass overwrite=True (CLI: --overwrite)")
        fill(staged.payload)
    return out


# ----------------------------------------------------------------------------- output paths
def check_output_path(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output",
                      directory: bool = True, error: type[Exception] = ValueError) -> Path:
    """Refuse an output location that cannot be created or would destroy an input.

    ``out`` must not lie under a regular file, must be a directory (``directory=True``) or a
    file if it exists, and (symlinks resolved) must not be, contain or lie inside any of
    ``inputs``: writing it, or replacing it with ``--overwrite``, would delete that input.
    Raises ``error`` naming both paths; returns ``out`` made absolute.
    """
    out_abs = Path(os.path.abspath(out))
    probe = out_abs
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    real_probe = Path(os.path.realpath(probe))
    if probe != out_abs and not real_probe.is_dir():
        raise error(f"{what} {out}: cannot create it, {probe} is a file, not a directory; choose another path")
    if probe == out_abs and os.path.exists(out_abs):
        if directory and not real_probe.is_dir():
            raise error(f"{what} {out} exists and is a file, not a directory; choose another path")
        if not directory and real_probe.is_dir():
            raise error(f"{what} {out} exists and is a directory, not a file; choose another path")
    real_out = Path(os.path.realpath(out_abs))
    for src in inputs:
        real_in = Path(os.path.realpath(src))
        if real_out == real_in:
            relation = "is the input"
        elif real_in in real_out.parents:
            relation = "lies inside the input"
        elif real_out in real_in.parents:
            relation = "contains the input"
        else:
            continue
        raise error(f"{what} {out} {relation} {src}" + (f" (both resolve to {real_out})" if real_out == real_in else "")
                    + "; writing it (or replacing it with --overwrite) would destroy the input. Choose an output "
                    "outside the input")
    return out_abs


__all__ = ["StagedDirectory", "write_directory", "DirLock", "BusyError", "agree", "run_agreed", "seal", "publish", "recover",
           "recover_root", "promote_legacy_staging", "remove_tree", "remove_stale_legacy", "is_sealed", "check_output_path",
           "crash_point", "CRASH_ENV", "CRASH_EXIT_CODE", "LEGACY_STALE_S"]
