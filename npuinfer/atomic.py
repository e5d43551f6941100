"""The one way npuinfer writes a result file: a temporary file beside it, fsync, rename over it.

A reader (or a run killed at any moment) sees the old file or the new one, never half of one. The
temporary name is unique per process and call, so processes writing the same file at once do not
clobber each other's temporary files; the last rename wins whole.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform / filesystem lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, data: str | bytes) -> Path:
    """A fully written and fsynced temporary file in path's directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8, newlines as given) all at once."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def create_atomic(path: str | os.PathLike, data: str | bytes) -> bool:
    """Write ``path`` only if it does not exist yet, all at once, even against other processes doing
    the same (a hard link never replaces a file); True when this call created it."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True
