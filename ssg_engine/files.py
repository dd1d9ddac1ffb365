"""Files that are either complete or absent (atomic writes), content hashes, and paths fit to commit."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

PathLike = Union[str, Path]
# The folder that holds the ``ssg_engine`` package: the repository in a checkout, site-packages when installed.
REPO_ROOT = Path(__file__).resolve().parents[1]


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # "no space left on device", "disk quota exceeded"


class OutputError(OSError):
    """An output could not be written (full disk, no permission, another run holding it). ``path`` is the output as
    the user named it; the message says what happened and the fix, and never names a temporary file."""

    def __init__(self, path: PathLike, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.errno = errno_


def output_error(path: PathLike, error: OSError) -> OutputError:
    """``error`` (raised while writing ``path``) as an :class:`OutputError` naming ``path`` and the fix."""
    if isinstance(error, OutputError):
        return error
    if error.errno in DISK_FULL:
        reason = "the disk is full; free some space or write somewhere else (nothing was written)"
    else:
        reason = f"{error.strerror or error}; choose another path (nothing was written)"
    return OutputError(path, f"cannot write {path}: {reason}", error.errno)


@contextlib.contextmanager
def exclusive_lock(path: PathLike, what: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created, removed on release) for the output ``what``; another
    process holding it means another run is writing ``what``: :class:`OutputError`, without waiting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(what, f"{what} is being written by another run; wait for it to finish or choose another path") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its holder removed it on release: lock the new one
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def temp_name(path: PathLike) -> Path:
    """The temporary file next to ``path`` that ``atomic_output`` hands out: ``.<stem>.tmp<pid><suffix>`` (the
    suffix kept, so writers that pick a format from it still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (folder created if missing); when the block completes it replaces
    ``path`` (``os.replace``), and whatever goes wrong (Ctrl-C included) it is removed. So ``path`` is absent,
    its old content, or complete. For writers that want a path (torch, PIL, matplotlib). An ``OSError`` while
    writing (a full disk) is raised as :class:`OutputError` naming ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` with :func:`atomic_output`, flushed to disk before the rename."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: PathLike, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def portable_path(path: PathLike) -> str:
    """``path`` as it may be written into a committed results file, never as a machine-specific absolute path:
    relative to the repository when inside it, ``~/...`` under the home folder, as given when relative,
    else only the file name."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    resolved = p.resolve()
    for base, prefix in ((REPO_ROOT, ""), (Path.home().resolve(), "~/")):
        try:
            return prefix + resolved.relative_to(base).as_posix()
        except ValueError:
            continue
    return p.name
