"""Atomic single-file writes: a temp file in the target's directory, then ``os.replace``.

Readers see the old file or the new one, never half of one; a failed write leaves no temp
file behind and re-raises. Finished files get the usual umask-derived mode (mkstemp would
leave them 0600). Directory-level atomic writes live in ``megamoe.checkpoint``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _file_mode(executable: bool = False) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
