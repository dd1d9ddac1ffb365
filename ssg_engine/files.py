"""Files that are either complete or absent (atomic writes), content hashes, and paths fit to commit."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

PathLike = Union[str, Path]
# The folder that holds the ``ssg_engine`` package: the repository in a checkout, site-packages when installed.
REPO_ROOT = Path(__file__).resolve().parents[1]


def temp_name(path: PathLike) -> Path:
    """The temporary file next to ``path`` that ``atomic_output`` hands out: ``.<stem>.tmp<pid><suffix>`` (the
    suffix kept, so writers that pick a format from it still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (folder created if missing); when the block completes it replaces
    ``path`` (``os.replace``), and whatever goes wrong (Ctrl-C included) it is removed. So ``path`` is absent,
    its old content, or complete. For writers that want a path (torch, PIL, matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
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
