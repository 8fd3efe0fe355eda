"""The render folder's event log: a `started` and a `finished` line per task run, one file per worker
process (<out>/.mmpl/events/<host>-<pid>-<worker>.jsonl), merged in time order when read (`mmpl
status`, how often each task was computed). Only its own process appends to a file, since appends
from several clients are not atomic over NFS; a line cut short by a crash is skipped when read.
The files are the folder's, so untrusted: what is not a plain file inside it is not read."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

from mmpl_cli.files import HOST, disk_errors, parse_json, read_bounded

MAX_EVENTS_BYTES = 1 << 30  # all event files together; what lies beyond is not read


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
                fh = open(path, "a")
            except FileNotFoundError:  # the first event of this render folder
                self.folder.mkdir(parents=True, exist_ok=True)
                fh = open(path, "a")
            with fh:
                fh.write(line)

    def files(self) -> list[Path]:
        """Every event file of the folder: one per worker process (and events.jsonl of folders
        written before that)."""
        store = self.store
        found = sorted(self.folder.glob("*.jsonl")) if store.inside(self.folder.relative_to(store.root)) and \
            self.folder.is_dir() else []
        return [store.meta / "events.jsonl", *found]

    def read(self, only: str | None = None) -> list[dict]:
        """Every worker's events merged in time order (`only`: of that kind); what is not an event is skipped."""
        out, budget = [], MAX_EVENTS_BYTES
        mark = json.dumps({"event": only})[1:-1] if only else ""  # as `log` encodes it; lines without it skipped
        for path in self.files():
            if budget <= 0 or not self.store._plain_file(path, budget):
                continue
            try:
                data = read_bounded(path, budget)
            except (OSError, ValueError):
                continue
            budget -= len(data)
            for line in data.decode(errors="replace").splitlines():
                if mark not in line:
                    continue
                try:
                    event = parse_json(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("task"), str):
                    out.append(event)
        out.sort(key=lambda e: e["time"] if isinstance(e.get("time"), (int, float)) else 0.0)
        return out

    def computed_counts(self) -> dict[str, int]:
        """How many times each task was computed to the end, over the folder's whole history."""
        return dict(Counter(e["task"] for e in self.read("finished") if e.get("event") == "finished"))
