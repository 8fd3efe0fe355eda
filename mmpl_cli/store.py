"""The render folder's results. This module is the only one that decides where things go in it and
the only reader of task results. It imports torch only where latents are read or written, so
validating a request stays quick; the claim protocol and the first worker's decisions live in
claims.py, the atomic writes in files.py, what a task file holds in results.py, and the runtime
encodes videos into the temporary paths this module hands out.

    <out>/<shot>.mp4                                  stitched videos
    <out>/segments/<shot>/s000.mp4                    per-segment videos
    <out>/<shot>.storyboard.png                       the macro plan's frames (--storyboard)
    <out>/.mmpl/manifest.json                         what was asked: resolved shots, profile, hashes, versions
    <out>/.mmpl/tasks/<shot>/s000-plan.safetensors    latents of a finished task (+ metadata)
    <out>/.mmpl/tasks/<shot>/s000-decode.json         record of a finished video task (file + sha256)
    <out>/.mmpl/events/<host>-<pid>-<worker>.jsonl    started / finished events, one file per process (events.py)
    <out>/.mmpl/claims/, seeding.json, numerics.json  claims and decisions (claims.py)

Every file is written atomically (files.py): a crash leaves the old file or the new one, never half
of one. A task file is used only if its hash is the task's and its checksums verify (a peer's file is
checked by its header until read: is_done); anything else is absent (warned) and computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.events import EventLog
from mmpl_cli.results import (Latents, Result, VideoFile, candidate_of, checksum_key, float32_tensors, header_of,
                              latents_from, tensor_checksum, tensors_from)
from mmpl_cli.files import (MAX_RECORD_BYTES, atomic_path, clean_temporary_files, disk_errors, load_json, read_bounded,
                            sha256_file, write_atomic)

STORE_VERSION = 1
META = ".mmpl"

DONE, MISSING, INVALID, STALE = "done", "missing", "invalid", "stale"
MAX_MANIFEST_BYTES = 256 << 20
MAX_TASK_FILE_BYTES = 1 << 30  # a task's latents: tens of MB at the largest sizes
DECISIONS = ("owner", "seeding", "numerics")  # .mmpl/<name>.json: what the first worker decided (claims.py)


class RenderStore:
    def __init__(self, root: Path, warn: Callable[[str], None] | None = None, worker: str = "main"):
        self.root = Path(root)
        self._prefix = os.path.join(os.path.abspath(self.root), "")  # what every path inside it starts with
        self.meta = self.root / META
        self.warn = warn or (lambda text: None)
        # task id -> (hash, file stamps, state): what a file was found to be, never its tensors, so a
        # worker's memory does not grow with the folder (a result is read again when it is needed)
        self._verified: dict[str, tuple] = {}
        self._absent: set[str] = set()  # tasks with no file at this worker's start (note_absent) or first look
        self._seen_folders: set[str] | None = None  # during a report: paths found not to be symlinks
        self.event_log = EventLog(self, worker)  # this process's own event file; every worker's, read

    # -- the folder ------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.json"

    def check_usable(self) -> None:
        """Refuse a folder with files that is not a render folder: we never write among a user's files."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise InputError(Problem(str(self.root), None, "--out", "expected a folder, found a file"))
        if self.manifest_path.exists():
            manifest = self.read_manifest()
            if manifest.get("store_version") != STORE_VERSION:
                raise InputError(Problem(str(self.root), None, "--out",
                                         f"render folder of another format ({manifest.get('store_version')})",
                                         "use --restart to render it again from scratch"))
            return
        if [p.name for p in self.root.iterdir()] == [META] and self.inside(META) is not None and self.meta.is_dir():
            return  # a worker is starting this render at the same time: its manifest is not written yet
        if any(self.root.iterdir()):
            raise InputError(Problem(str(self.root), None, "--out",
                                     "this folder has files but is not an mmpl render folder (no .mmpl/manifest.json)",
                                     "choose an empty or new folder with --out"))

    def read_manifest(self) -> dict:
        if os.path.lexists(self.manifest_path) and not self._plain_file(self.manifest_path, MAX_MANIFEST_BYTES):
            raise InputError(Problem(str(self.manifest_path), None, "",
                                     f"not a plain file of at most {MAX_MANIFEST_BYTES >> 20} MB inside the folder"))
        try:
            manifest = load_json(self.manifest_path, MAX_MANIFEST_BYTES)
            if not isinstance(manifest, dict):
                raise ValueError(f"expected a JSON object, found {type(manifest).__name__}")
            return manifest
        except FileNotFoundError:
            raise InputError(Problem(str(self.root), None, "", "not an mmpl render folder (no .mmpl/manifest.json)")) from None
        except (OSError, ValueError) as exc:
            raise InputError(Problem(str(self.manifest_path), None, "", f"unreadable manifest: {exc}")) from None

    def write_manifest(self, manifest: dict) -> None:
        # one line (json's C encoder: a thousand shots' manifest in tens of milliseconds, not a second
        # per worker with indent); `mmpl status` is how people read it
        write_atomic(self._confined(self.manifest_path), json.dumps({**manifest, "store_version": STORE_VERSION},
                                                                    sort_keys=True).encode())

    def clean_temporary_files(self, older_than: float = 0.0) -> None:  # what interrupted writes left
        clean_temporary_files(self.root, older_than)

    def decision(self, name: str) -> Path:
        """Where the folder's record of a first worker's decision lives (DECISIONS)."""
        assert name in DECISIONS, name
        return self.meta / f"{name}.json"

    @property
    def claims_folder(self) -> Path:
        """Where the claims go: refused (exit 2) if a symlink leads there, or claiming and its clean-up
        would link, and remove, files wherever it points."""
        return self._confined(self.meta / "claims", follows_last=True)

    def restart(self, shot_ids: list[str]) -> None:
        """Forget every finished task and remove the videos of these shots: the explicit fresh start."""
        folders = (self.meta / "tasks", self.root / "segments")
        for folder in folders:  # before anything is removed
            try:
                kind = os.lstat(folder).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(kind) and not stat.S_ISLNK(kind):  # a FIFO held rmtree's open forever
                raise InputError(Problem(str(folder), None, "--restart", "expected a folder, found a file or FIFO "
                                         "(planted?); nothing was removed", "move it away, or render into a new folder"))
        with disk_errors(self.root):
            for name in DECISIONS:
                self.decision(name).unlink(missing_ok=True)
            for folder in folders:
                try:
                    shutil.rmtree(folder, ignore_errors=True)
                except RecursionError:  # Python 3.11's rmtree recurses once per level
                    raise InputError(Problem(str(folder), None, "--restart", "holds folders nested too deep to "
                                             "remove (mmpl makes none deeper than one); nothing was rendered",
                                             f"remove it yourself: rm -rf {shlex.quote(str(folder))}")) from None
            for shot_id in shot_ids:
                (self.root / f"{shot_id}.mp4").unlink(missing_ok=True)
                self.storyboard(shot_id).unlink(missing_ok=True)

    # -- tasks -----------------------------------------------------------------------------

    def _task_path(self, task_id: str, suffix: str) -> str:
        """A task file's path as a string: status and polling workers check thousands at a time."""
        shot, _, rest = task_id.partition("/")
        return f"{self.meta}/tasks/{shot}/{rest.replace('/', '-')}{suffix}"

    def segment_video(self, shot_id: str, index: int) -> Path:
        return self.root / "segments" / shot_id / f"s{index:03d}.mp4"

    def shot_video(self, shot_id: str) -> Path:
        return self.root / f"{shot_id}.mp4"

    def storyboard(self, shot_id: str) -> Path:
        return self.root / f"{shot_id}.storyboard.png"

    def write_storyboard(self, shot_id: str, png: bytes) -> Path:
        path = self.storyboard(shot_id)
        write_atomic(self._confined(path), png)
        return path

    def state(self, task_id: str, task_hash: str) -> str:
        """done / missing / invalid (unreadable or altered) / stale (made from other inputs)."""
        return self._load(task_id, task_hash, quiet=True, result=False)[0]

    def _stamp(self, task_id: str) -> tuple | None:
        """(size, mtime, inode) of a task's files, None where there is none; None if neither is there."""
        stamp = []
        for suffix in (".safetensors", ".json"):
            try:
                info = os.stat(self._task_path(task_id, suffix))
                stamp.append((info.st_size, info.st_mtime_ns, info.st_ino))
            except FileNotFoundError:
                stamp.append(None)
            except OSError:
                return ()  # unreadable just now (NFS): not there, and not known to be absent either
        return None if stamp == [None, None] else tuple(stamp)

    def load(self, task_id: str, task_hash: str) -> Result | None:
        """The finished result of a task with this hash, read and verified, or None (warning once
        per version of the file if it was unusable)."""
        stamp = self._stamp(task_id)
        if not stamp:
            return None
        cached = self._verified.get(task_id)
        if cached is not None and cached[:2] == (task_hash, stamp) and cached[2] != DONE:
            return None  # said once for this version of the file
        state, result = self._load(task_id, task_hash, quiet=False)
        self._verified[task_id] = (task_hash, stamp, state)
        return result

    def note_absent(self, task_ids: Iterable[str]) -> None:
        """Remember which of these tasks have no file now (one listing of each shot's folder): a file
        that appears for one of them later was written in this run, by another worker (is_done)."""
        listed: dict[str, set[str] | None] = {}
        for task_id in task_ids:
            folder, stem = os.path.split(self._task_path(task_id, ""))
            if folder not in listed:
                try:
                    listed[folder] = set(os.listdir(folder))
                except FileNotFoundError:
                    listed[folder] = set()
                except OSError:  # cannot tell: its files are verified whole when found
                    listed[folder] = None
            names = listed[folder]
            if names is not None and f"{stem}.safetensors" not in names and f"{stem}.json" not in names:
                self._absent.add(task_id)

    def is_done(self, task_id: str, task_hash: str) -> bool:
        """Whether the task has a usable result: checked once per version of its files (size, mtime,
        inode), then answered from two stats. A file there when this worker first looked (note_absent
        at its start, or an earlier is_done) is verified whole, as on a resume; one that appeared later
        was written in this run by another worker: its header is checked (hash, extent) and its
        contents when this worker reads it (`load`), so workers do not each read and hash every file
        the others write."""
        stamp = self._stamp(task_id)
        if not stamp:
            if stamp is None:
                self._absent.add(task_id)
            return False
        cached = self._verified.get(task_id)
        if cached is None or cached[:2] != (task_hash, stamp):
            whole = task_id not in self._absent
            state = self._load(task_id, task_hash, quiet=False, result=False, whole=whole)[0]  # said once per version
            cached = self._verified[task_id] = (task_hash, stamp, state)
        return cached[2] == DONE

    def _load(self, task_id: str, task_hash: str, quiet: bool, result=True, whole=True) -> tuple[str, Result | None]:
        """The task's state, and (`result`) what it made: without it, a file is only verified (no
        torch: `mmpl status`); without `whole`, only its header or record, not its checksums."""
        latents_file = self._task_path(task_id, ".safetensors")
        record_file = self._task_path(task_id, ".json")
        for path, load in ((latents_file, self._load_latents), (record_file, self._load_record)):
            if os.path.lexists(path):
                if not self._plain_file(path, MAX_RECORD_BYTES if path is record_file else MAX_TASK_FILE_BYTES):
                    return self._invalid(task_id, "task file is not a plain file inside the folder", quiet)
                return load(task_id, path, task_hash, quiet, result, whole)
        return MISSING, None

    def _plain_file(self, path: Path | str, max_bytes: int | None = None) -> bool:
        """A regular file inside the folder, reached without a symlink (and not over max_bytes)."""
        rel = self._relative(path)
        try:
            info = os.lstat(path)
        except OSError:
            return False
        return rel is not None and self._no_link(rel) and stat.S_ISREG(info.st_mode) and \
            (max_bytes is None or info.st_size <= max_bytes)

    def _invalid(self, task_id: str, why: str, quiet: bool) -> tuple[str, None]:
        if not quiet:
            self.warn(f"warning: {task_id}: {why}; computing it again")
        return INVALID, None

    def _load_latents(self, task_id, path, task_hash, quiet, result, whole):
        try:
            meta, parts = float32_tensors(read_bounded(path, MAX_TASK_FILE_BYTES)) if whole else header_of(path)
        except (OSError, ValueError) as exc:  # any unreadable file is simply not a result
            return self._invalid(task_id, f"unreadable task file ({exc})", quiet)
        if not whole:  # the header: tensor names
            if "latents" not in parts:
                return self._invalid(task_id, "task file of the wrong shape", quiet)
            return (DONE if meta.get("hash") == task_hash else STALE), None
        if "latents" not in parts or any(meta.get(checksum_key(k)) != hashlib.sha256(v).hexdigest()
                                         for k, (_, v) in parts.items()):
            return self._invalid(task_id, "task file altered (checksum mismatch)", quiet)
        if meta.get("hash") != task_hash:
            return STALE, None
        import numpy as np  # no task saves NaN or inf (runtime's finite check): one read back was planted

        if not all(np.isfinite(np.frombuffer(data, np.float32)).all() for _, data in parts.values()):
            return self._invalid(task_id, "task file holds NaN or infinity", quiet)
        try:
            candidate_of(parts)
            if not result:
                return DONE, None
            return DONE, latents_from(tensors_from(parts))  # torch only where latents are read or written
        except Exception:  # noqa: BLE001 - what safetensors itself refuses is not a result either
            return self._invalid(task_id, "task file of the wrong shape", quiet)

    def _load_record(self, task_id, path, task_hash, quiet, result, whole):
        # a render folder's contents are untrusted: the record must be what save_video writes, and
        # the file it names a regular file inside the folder, reached without a symlink
        try:
            record = load_json(path, MAX_RECORD_BYTES)
        except (OSError, ValueError):
            return self._invalid(task_id, "unreadable task record", quiet)
        if not (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("file", "hash", "sha256"))):
            return self._invalid(task_id, "task record of the wrong shape", quiet)
        if record["hash"] != task_hash:
            return STALE, None
        if record["file"] != self._video_of(task_id):  # another file of the folder: another task's video, or a
            return self._invalid(task_id, "task record names another file", quiet)  # name with a line break
        target = self.inside(record["file"])
        if target is None:
            return self._invalid(task_id, "task record names a file outside the render folder", quiet)
        if not os.path.lexists(target):
            return MISSING, None
        if not stat.S_ISREG(os.lstat(target).st_mode):
            return self._invalid(task_id, "task record names something that is not a plain file", quiet)
        if whole and sha256_file(target) != record["sha256"]:
            return self._invalid(task_id, f"{record['file']} was altered", quiet)
        return DONE, VideoFile(target)

    def _video_of(self, task_id: str) -> str:
        """The file a video task's record names, as save_video writes it ("" for a task that makes none)."""
        shot, _, rest = task_id.partition("/")
        segment, _, kind = rest.partition("/")
        if rest == "stitch":
            path = self.shot_video(shot)
        elif kind == "decode" and segment[1:].isascii() and segment[1:].isdigit():
            path = self.segment_video(shot, int(segment[1:]))
        else:
            return ""
        return str(path.relative_to(self.root))

    def inside(self, relative: str | Path) -> Path | None:
        """root / relative if that stays inside the folder with no symlink on the way, else None."""
        rel = Path(relative)
        return self.root / rel if self._no_link(str(rel)) else None

    def _no_link(self, relative: str) -> bool:
        """`relative` stays inside the folder, with no symlink on the way (strings, not pathlib:
        `mmpl status` asks this of every task file)."""
        parts = [p for p in relative.split(os.sep) if p not in ("", ".")]
        if relative.startswith(os.sep) or ".." in parts:
            return False
        at, seen = str(self.root), self._seen_folders
        for part in parts:
            at = f"{at}{os.sep}{part}"
            if seen is None or at not in seen:
                if os.path.islink(at):
                    return False
                if seen is not None:
                    seen.add(at)
        return True

    def _relative(self, path: Path | str) -> str | None:
        """`path` relative to the folder, as text, or None if it is not under it by its name (strings,
        not pathlib: a worker asks this several times a task). abspath drops `a/..` without asking
        whether `a` is a symlink, so a path with `..` is None."""
        text = os.path.abspath(path)
        climbs = f"{os.sep}..{os.sep}" in f"{os.sep}{os.fspath(path)}{os.sep}"
        return text[len(self._prefix):] if text.startswith(self._prefix) and not climbs else None

    def _confined(self, path: Path, follows_last: bool = False) -> Path:
        """`path`, unless a symlink planted in the folder would lead the write outside it (exit 2). An
        atomic write replaces a symlink in the last place rather than following it; an append
        (`follows_last`) would follow it."""
        rel = self._relative(path)
        if rel is None or not self._no_link(rel if follows_last else os.path.dirname(rel)):
            raise InputError(Problem(str(self.root), None, "--out",
                                     f"{path} leads outside the render folder (a symlink in it?); nothing was written",
                                     "remove the symlink, or render into a new folder"))
        return path

    def save(self, task_id: str, task_hash: str, result: Latents) -> Latents:
        """Persist a denoising task's latents; returns them as later loads will see them."""
        import torch
        from safetensors.torch import save as safetensors_bytes  # torch only where latents are written

        named = {"latents": result.latents} | ({"window": result.window} if result.window is not None else {})
        tensors = {key: value.detach().cpu().float().contiguous() for key, value in named.items()}
        if result.candidate:  # a tensor, so the file's checksums cover it
            tensors["candidate"] = torch.tensor([float(result.candidate)])
        meta = {"task": task_id, "hash": task_hash, **{checksum_key(k): tensor_checksum(t) for k, t in tensors.items()}}
        write_atomic(self._confined(Path(self._task_path(task_id, ".safetensors"))), safetensors_bytes(tensors, metadata=meta))
        return latents_from(tensors)

    @contextmanager
    def video_file(self, path: Path) -> Iterator[Path]:
        """A temporary path to encode the video `path` into; it is moved into place on success."""
        with atomic_path(self._confined(path)) as tmp:
            yield tmp

    def save_video(self, task_id: str, task_hash: str, path: Path) -> VideoFile:
        """Record a video task whose file is in place (written through video_file)."""
        record = {"task": task_id, "hash": task_hash, "file": str(path.relative_to(self.root)),
                  "sha256": sha256_file(path)}
        write_atomic(self._confined(Path(self._task_path(task_id, ".json"))), json.dumps(record, indent=1).encode())
        return VideoFile(path)

    def report(self) -> dict:
        """What `mmpl status` shows: per shot, segment and task, done / missing / invalid / stale, how often
        computed, and the command that resumes. A manifest of the wrong shape is exit 2 naming the file."""
        from mmpl_cli.reports import status_report

        self._seen_folders = set()  # a snapshot: each folder on the way is checked for a symlink once
        try:
            return status_report(self, self.read_manifest())
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise InputError(Problem(str(self.manifest_path), None, "",
                                     f"not the manifest mmpl writes ({type(exc).__name__}: {exc})")) from None
        finally:
            self._seen_folders = None
