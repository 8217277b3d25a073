"""Atomic single-file writes: a temp file in the target's directory, then ``os.replace``.

Readers see the old file or the new one, never half of one; a failed write leaves no temp
file behind and re-raises, a write cut short by a full disk (or quota, or file size limit) as
:class:`OutOfSpaceError` naming the target. Finished files get the usual umask-derived mode
(mkstemp would leave them 0600). Directories are written atomically by
``megamoe.checkpoint.staged.StagedDirectory``.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable


def _file_mode(executable: bool = False) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


def give_usual_mode(path: str | os.PathLike) -> None:
    """Give a finished file the umask-derived mode (keeping its owner-execute bit): writers
    that create files 0600 themselves (mkstemp, safetensors) would otherwise publish files
    other users of a shared checkpoint folder cannot read."""
    executable = bool(os.stat(path).st_mode & 0o100)
    os.chmod(path, _file_mode(executable))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, executable: bool = False) -> Path:
    """Call ``write(tmp_path)`` to produce the content, then move it to ``path``.

    ``executable=True`` gives the file execute bits (as the umask allows), e.g. for scripts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(executable))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = None if isinstance(exc, OutOfSpaceError) else out_of_space_error(exc, path)
        if full is not None:
            raise full from exc
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, executable: bool = False) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write, executable=executable)


def atomic_write_text(path: str | os.PathLike, text: str, *, executable: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), executable=executable)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from ``kwargs`` or the path's suffix)."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How torch ("unexpected pos N vs M"), numpy ("N requested and M written") and safetensors
# ("os error 28") report a short write; they carry no errno.
_NO_SPACE_TEXT = re.compile(r"no space left|disk is full|disk quota|file too large|unexpected pos \d+ vs \d+|os error (28|27|122)\b"
                            r"|\d+ requested and \d+ written")


class OutOfSpaceError(OSError):
    """A write was cut short (disk full, quota or file size limit); nothing half-written is left.

    ``path`` is what was being written, ``detail`` the low-level report."""

    def __init__(self, path: str | os.PathLike, detail: str) -> None:
        self.path, self.detail = str(path), detail
        self.message = (f"writing {path} failed: the disk is full, over quota or at a file size limit ({detail}); "
                        "nothing half-written was left behind. Free space (or choose another directory) and run "
                        "again")
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message


def out_of_space_error(exc: BaseException, path: str | os.PathLike) -> OutOfSpaceError | None:
    """An :class:`OutOfSpaceError` naming ``path`` when ``exc`` (or its cause) is a write cut
    short for lack of space, else None."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutOfSpaceError):
            return OutOfSpaceError(path, e.detail)
        text = str(e)
        if (isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS) or _NO_SPACE_TEXT.search(text.lower()):
            return OutOfSpaceError(path, text[:200])
        e = e.__cause__ or e.__context__
    return None
