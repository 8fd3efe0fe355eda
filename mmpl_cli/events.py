"""The render folder's event log: a `started` and a `finished` line per task run, one file per worker
process (<out>/.mmpl/events/<host>-<pid>-<worker>.jsonl), merged in time order when read (`mmpl
status`, how often each task was computed). Only its own process appends to a file, since appends
from several clients are not atomic over NFS; a line cut short by a crash is skipped when read.
The files are the folder's, so untrusted: what is not a plain file inside it is not read."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.files import HOST, disk_errors, parse_json

MAX_EVENTS_BYTES = 1 << 30  # all event files together; what lies beyond is not read
MAX_LINE_BYTES = 1 << 16  # an event mmpl writes is a few hundred bytes: a longer line is none


class EventLog:
    def __init__(self, store, worker: str = "main"):
        self.store = store  # the render folder (store.RenderStore): where its files are and which it trusts
        self.folder = store.meta / "events"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", worker)[:64]
        self.path = self.folder / f"{HOST}-{os.getpid()}-{name}.jsonl"  # this process's own file

    def log(self, event: str, task_id: str, task_hash: str, **extra) -> None:
        """Append one line to this process's event file (only this process writes it, so no line
        of another worker's can interleave, whatever the file system)."""
        line = json.dumps({"event": event, "task": task_id, "hash": task_hash, "pid": os.getpid(),
                           "time": round(time.time(), 3), **extra}) + "\n"
        with disk_errors(self.path):
            path = self.store._confined(self.path, follows_last=True)
            try:
                fh = self._open(path)
            except FileNotFoundError:  # the first event of this render folder
                self.folder.mkdir(parents=True, exist_ok=True)
                fh = self._open(path)
            with fh:
                fh.write(line)

    def _open(self, path: Path):
        """This process's event file for appending. Its name is foreseeable (host, pid, worker), so
        something planted there is refused (exit 2) without waiting: a FIFO's open would block
        until a reader came, and a device's could do anything."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        fd = None
        try:
            if info is None or stat.S_ISREG(info.st_mode):
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
                info = os.fstat(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ELOOP):  # ENXIO: a FIFO with no reader; ELOOP: a symlink
                raise
        if fd is None or not stat.S_ISREG(info.st_mode):
            if fd is not None:
                os.close(fd)
            raise InputError(Problem(str(path), None, "--out", "expected this worker's event log to be a plain file "
                                     "or none, found something else (planted?); nothing was written",
                                     "remove it, or render into a new folder"))
        return os.fdopen(fd, "a")

    def files(self) -> list[Path]:
        """Every event file of the folder: one per worker process (and events.jsonl of folders
        written before that)."""
        store = self.store
        found = sorted(self.folder.glob("*.jsonl")) if store.inside(self.folder.relative_to(store.root)) and \
            self.folder.is_dir() else []
        return [store.meta / "events.jsonl", *found]

    def read(self, only: str | None = None) -> list[dict]:
        """Every worker's events merged in time order (`only`: of that kind); what is not an event is skipped."""
        return sorted(self._events(only), key=lambda e: e["time"] if isinstance(e.get("time"), (int, float)) else 0.0)

    def _events(self, only: str | None) -> Iterator[dict]:
        """The events of every file, a line at a time (a planted file of a gigabyte costs time, not
        memory): at most MAX_EVENTS_BYTES in all, lines of at most MAX_LINE_BYTES."""
        budget = MAX_EVENTS_BYTES
        mark = json.dumps({"event": only})[1:-1].encode() if only else b""  # as `log` encodes it; lines without it skipped
        for path in self.files():
            if budget <= 0 or not self.store._plain_file(path, budget):
                continue
            try:
                fh = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")  # never waits on a FIFO
            except OSError:
                continue
            with fh:
                while budget > 0:
                    raw = fh.readline(MAX_LINE_BYTES + 1)
                    if not raw:
                        break
                    budget -= len(raw)
                    if len(raw) > MAX_LINE_BYTES:  # no event: the rest of its line is read and dropped
                        while budget > 0 and raw and not raw.endswith(b"\n"):
                            raw = fh.readline(MAX_LINE_BYTES)
                            budget -= len(raw)
                        continue
                    if mark not in raw:
                        continue
                    try:
                        event = parse_json(raw.decode(errors="replace"))
                    except ValueError:
                        continue
                    if isinstance(event, dict) and isinstance(event.get("task"), str):
                        yield event

    def computed_counts(self) -> dict[str, int]:
        """How many times each task was computed to the end, over the folder's whole history."""
        return dict(Counter(e["task"] for e in self._events("finished") if e.get("event") == "finished"))
