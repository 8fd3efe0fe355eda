"""Writing files so that a crash never leaves half of one: the one helper every writer uses (the
render folder's store, its claims and decisions, training's checkpoints and model folder); and the
one bounded reader every JSON input goes through (`read_bounded`, `parse_json`, `load_json`) and
the one way an init image is opened (`open_image`, its size checked before decoding).

A file is written to a temporary name in its own folder that says which host and process writes it,
flushed and fsynced, renamed into place, and the folder fsynced: readers see the old file or the
new one. What an interrupted write leaves behind is recognisable by its name and removed later.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmpl_cli.errors import InputError, MMPLError, Problem

TMP_MARK = ".tmp-"
HOST = hashlib.sha1(os.uname().nodename.encode()).hexdigest()[:8]


class StoreError(MMPLError):
    """The disk failed us (full, read-only, gone); finished work stays as it is."""


PID_LIMIT = 1 << 22  # Linux's largest pid_max: a pid a render folder names beyond it is no process


def alive(pid: int) -> bool:
    """Whether a process of this machine is still running (a pid read from a render folder's file
    names may be anything: 0 and below would ask about process groups, and a huge one overflows)."""
    if not 0 < pid < PID_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_RECORD_BYTES = 1 << 16  # a record mmpl writes (task record, decision, training progress) is a few hundred bytes


class TooLarge(ValueError):
    """A file or stream longer than its reader's limit."""


def read_bounded(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of `path` (a file, a pipe, a device such as /dev/zero): TooLarge past
    that, so an endless stream costs `limit` bytes of memory, never more."""
    with open(path, "rb") as fh:
        # a plain file is read at its length (+1: a file grown meanwhile is read on): asking for the
        # limit at once makes Python allocate it whole first (80 us for a 12 KB task file, not 11)
        first = min(os.fstat(fh.fileno()).st_size, limit) + 1
        raw = fh.read(first)
        if len(raw) == first <= limit:  # more than its length said: a pipe, a device, a growing file
            raw += fh.read(limit + 1 - first)
    if len(raw) > limit:
        raise TooLarge(f"larger than {_size(limit)}")
    return raw


def parse_json(raw: bytes | str) -> Any:
    """JSON -> Python values; anything malformed (nesting too deep to parse, NUL in a text, a
    number with thousands of digits) is a ValueError, never another exception."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    # JSON can spell NUL only as the escape \u0000 (a raw one is not JSON): without that text, no
    # value holds one, and the walk over every value is skipped (bytes with any NUL byte may be
    # UTF-16 or UTF-32, which json.loads reads too: those are walked)
    binary = isinstance(raw, (bytes, bytearray))
    if ((b"\\u0000" in raw or b"\x00" in raw) if binary else "\\u0000" in raw) and _has_nul(value):
        raise ValueError("a text contains a NUL character")
    return value


def load_json(path: Path, limit: int) -> Any:
    """read_bounded + parse_json: OSError when unreadable, ValueError when malformed or too large."""
    return parse_json(read_bounded(path, limit))


def _has_nul(value: Any) -> bool:
    stack = [value]  # iterative: parse_json bounded the depth, this must not recurse past it
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB" if n >= 1 << 10 else f"{n} bytes"


def check_output(path: Path, option: str, folder: bool = False) -> Path:
    """Refuse (exit 2, before any work) an output path that cannot be written: a file where a
    folder must be or the reverse, or a path under a file. Folders on the way may be missing."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(Problem(str(path), None, option, "expected a folder, found a file"))
        if not folder and path.is_dir():
            raise InputError(Problem(str(path), None, option, "expected a file name, found a folder"))
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise InputError(Problem(str(path), None, option, f"{ancestor} is a file, not a folder"))
    return path


MAX_IMAGE_SIDE = 8192  # init images are cropped and resized to the profile's size (at most 8192 too)


@contextmanager
def open_image(path: Path, field: str = "init_image") -> Iterator["PIL.Image.Image"]:  # noqa: F821
    """An image file, opened with only its header read: a plain file, no side over MAX_IMAGE_SIDE
    (checked before decoding, so a decompression bomb costs nothing). Anything else is bad input."""
    from PIL import Image, UnidentifiedImageError

    def refuse(why: str):
        return InputError(Problem(str(path), None, field, why))

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise refuse("expected an image file, found something that is not a plain file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise refuse(f"expected an image of at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels, found a far larger one") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise refuse(f"cannot read the image: {exc}") from None
    with img:
        if max(img.size) > MAX_IMAGE_SIDE:
            raise refuse(f"expected an image of at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels, "
                         f"found {img.width}x{img.height}")
        yield img


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MAX_DIGEST_CACHE_BYTES = 16 << 20
MAX_DIGEST_CACHE_ENTRIES = 20_000


def cache_dir() -> Path:
    """Where mmpl keeps what it can recompute: $MMPL_CACHE_DIR, else $XDG_CACHE_HOME/mmpl, else ~/.cache/mmpl."""
    if os.environ.get("MMPL_CACHE_DIR"):
        return Path(os.environ["MMPL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmpl"


class DigestCache:
    """SHA-256 of files, each read once per version: a digest is reused while the file's size,
    mtime, ctime, inode and device are what they were when it was read (writing a file, even with
    its mtime set back, moves its ctime), so an unchanged weight file costs one stat. Kept per host
    (nodes sharing a home see other inodes), and only for files not written in the last 2 seconds. Kept in
    cache_dir()/digests.json; a cache that cannot be read or written is simply not used (it holds
    nothing that cannot be recomputed, and is never trusted further than its stamps)."""

    def __init__(self, path: Path | None = None):
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            self.path: Path | None = path or cache_dir() / "digests.json"
        except RuntimeError:  # no home folder to be found: no cache
            self.path = None
            return
        try:
            found = load_json(self.path, MAX_DIGEST_CACHE_BYTES)
        except (OSError, ValueError):  # none yet, or unreadable: start afresh
            return
        if isinstance(found, dict):
            self.entries = {k: v for k, v in found.items() if isinstance(v, list) and len(v) == 2
                            and isinstance(v[1], str) and len(v[1]) == 64}

    def digest(self, path: Path, read: Callable[[int], None] | None = None) -> str:
        """The file's SHA-256; `read(size)` is called before a file is read in full."""
        def stamp_of(info: os.stat_result) -> list[int]:
            return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]

        # per host: a shared home's cache is read by nodes that see other inodes and devices
        key, before = f"{HOST}:{Path(path).resolve()}", os.stat(path)
        known = self.entries.get(key)
        if known is not None and known[0] == stamp_of(before):
            return known[1]
        if read is not None:
            read(before.st_size)
        digest = sha256_file(path)
        after = os.stat(path)
        self.entries.pop(key, None)
        # remembered only if the file did not change while it was read, nor just before (a same-size
        # rewrite within the file system's timestamp tick would keep the stamps)
        if stamp_of(after) == stamp_of(before) and time.time() - after.st_mtime > 2.0:
            self.entries[key] = [stamp_of(after), digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed or self.path is None:
            return
        entries = dict(list(self.entries.items())[-MAX_DIGEST_CACHE_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(entries))
        except (OSError, MMPLError):
            pass  # a read-only home, say: the next run reads the files again


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_errors(what: Path) -> Iterator[None]:
    """OSError while writing `what` -> StoreError with one line that says what happened; a folder
    where mmpl writes a file, or a file where it needs a folder, is bad input (exit 2): put there by
    someone else, it would stop every resume the same way."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"no space left on the device while writing {what}") from None
        blocked = _in_the_way(exc, Path(what))
        if blocked:
            raise InputError(Problem(str(blocked), None, "", "a folder stands where mmpl writes a file" if blocked.is_dir()
                                     else f"a file stands where mmpl needs a folder (to write {what})",
                                     "move it away, or render into a new folder")) from None
        raise StoreError(f"cannot write {what}: {exc.strerror or exc}") from None


def _in_the_way(exc: OSError, what: Path) -> Path | None:
    """What made a write fail by standing in its way: a folder where a file goes (EISDIR), or a file
    where a folder goes (EEXIST from mkdir, ENOTDIR); None for any other failure."""
    named = [Path(n) for n in (exc.filename2, exc.filename) if isinstance(n, str)]
    try:
        if exc.errno == errno.EISDIR:
            return next((n for n in [*named, what] if n.is_dir() and not n.is_symlink()), None)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            on_the_way = [*(p for n in named for p in (n, *n.parents)), *what.parents]
            return next((p for p in on_the_way if p.exists() and not p.is_dir()), None)
    except OSError:  # cannot even look (permissions, a name too long): the plain message says enough
        pass
    return None


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


TEMPORARY_DEPTH = 3  # mmpl writes no file deeper below a render folder than .mmpl/tasks/<shot>/


def clean_temporary_files(root: Path, older_than: float = 0.0) -> None:
    """Remove what interrupted writes left under `root`, down to TEMPORARY_DEPTH folders: temporary
    names whose writer is a dead process on this machine, or older than `older_than` seconds (a live
    writer elsewhere cannot be writing them any more). Folders nested deeper are not mmpl's (Python
    3.11's os.walk recursed once per level: a planted tree 1,000 deep ended every render)."""
    now = time.time()
    top = os.fspath(root)
    # os.walk, not Path.rglob: each worker's start walks the whole folder (33,000 files at a thousand
    # shots), and rglob builds a Path per name; neither goes into a folder that is a symlink
    for folder, below, names in os.walk(top):
        if folder[len(top):].count(os.sep) >= TEMPORARY_DEPTH:
            below.clear()
        for name in names:
            if TMP_MARK not in name:
                continue
            path = os.path.join(folder, name)
            try:
                writer = name.split(TMP_MARK, 1)[1].split("-")
                dead_here = writer[0] == HOST and not alive(int(writer[1]))
                if os.path.isfile(path) and (dead_here or now - os.stat(path).st_mtime >= older_than):
                    os.unlink(path)
            except (FileNotFoundError, IndexError, ValueError):
                continue
