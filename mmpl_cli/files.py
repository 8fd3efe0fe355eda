"""Writing files so that a crash never leaves half of one: the one helper every writer uses (the
render folder's store, its claims and decisions, training's checkpoints and model folder).

A file is written to a temporary name in its own folder that says which host and process writes it,
flushed and fsynced, renamed into place, and the folder fsynced: readers see the old file or the
new one. What an interrupted write leaves behind is recognisable by its name and removed later.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmpl_cli.errors import MMPLError

TMP_MARK = ".tmp-"
HOST = hashlib.sha1(os.uname().nodename.encode()).hexdigest()[:8]


class StoreError(MMPLError):
    """The disk failed us (full, read-only, gone); finished work stays as it is."""


def alive(pid: int) -> bool:
    """Whether a process of this machine is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_errors(what: Path) -> Iterator[None]:
    """OSError while writing `what` -> StoreError with one line that says what happened."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"no space left on the device while writing {what}") from None
        raise StoreError(f"cannot write {what}: {exc.strerror or exc}") from None


def temporary_name(path: Path) -> Path:
    """A temporary name beside `path` that says which host and process is writing it."""
    return path.with_name(f".{path.stem}{TMP_MARK}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (with any writer: ffmpeg, torch.save,
    safetensors); on success it is fsynced and renamed into place, on failure removed."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        try:
            yield tmp
            _commit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write bytes (or text, as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def clean_temporary_files(root: Path, older_than: float = 0.0) -> None:
    """Remove what interrupted writes left under `root`: temporary names whose writer is a dead
    process on this machine, or older than `older_than` seconds (a live writer elsewhere cannot be
    writing them any more)."""
    if not root.exists():
        return
    now = time.time()
    for path in root.rglob(f"*{TMP_MARK}*"):
        try:
            writer = path.name.split(TMP_MARK, 1)[1].split("-")
            dead_here = writer[0] == HOST and not alive(int(writer[1]))
            if path.is_file() and (dead_here or now - path.stat().st_mtime >= older_than):
                path.unlink(missing_ok=True)
        except (FileNotFoundError, IndexError, ValueError):
            continue
