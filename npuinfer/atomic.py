"""The one way npuinfer writes a result file: a temporary file beside it, fsync, rename over it.

A reader (or a run killed at any moment) sees the old file or the new one, never half of one. The
temporary name is unique per process and call, so processes writing the same file at once do not
clobber each other's temporary files; the last rename wins whole.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
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


def current_umask() -> int:
    """The process umask. /proc tells it without changing it; elsewhere it is set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permission bits ``path`` should end with: a replaced file keeps its own, a new one follows the umask
    (mkstemp's temporary files are 0600, and the rename would otherwise hand that on)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _write_temp(path: Path, data: str | bytes) -> Path:
    """A fully written and fsynced temporary file in path's directory, with the mode ``path`` should have.
    A failure (disk full, read-only) is an OSError naming ``path``, not the temporary file or nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    tmp = Path(name)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError of the same errno (so the same subclass) that names the file being written."""
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", str(path)) if exc.errno else \
        OSError(f"cannot write {path}: {exc}")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8, newlines as given) all at once."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    fsync_dir(path.parent)
    return True


# ---- directories: a staged copy swapped in whole (npuinfer baseline update)


def sibling(directory: Path, role: str) -> Path:
    """Where an update stages a baseline directory (``staging``), or parks the old one (``previous``)."""
    return directory.with_name(f".{directory.name}.{role}")


def fsync_tree(directory: Path) -> None:
    """Every file and directory under ``directory`` on disk before it is swapped in."""
    for path in sorted(directory.rglob("*"), reverse=True) + [directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_directory(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``. With RENAME_EXCHANGE the two trade places at once and the old tree is
    deleted from the staging name. Elsewhere the old tree is first renamed to ``.<name>.previous``; a kill
    between the two renames is repaired by the next update (`recover_interrupted_swap`)."""
    if out.is_dir() and _exchange(staging, out):
        fsync_dir(out.parent)
        shutil.rmtree(staging)
        return
    previous = sibling(out, "previous")
    if out.exists():
        os.rename(out, previous)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if previous.exists():
        shutil.rmtree(previous)



def recover_interrupted_swap(out: Path) -> None:
    """Finish what a killed `swap_directory` left: the old tree parked with no new one in place comes back; parked
    beside a complete new one, it is deleted."""
    previous = sibling(out, "previous")
    if not previous.is_dir():
        return
    if out.exists():
        shutil.rmtree(previous)
    else:
        os.rename(previous, out)
