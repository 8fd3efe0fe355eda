"""The render folder. This module is the only one that writes into it. It imports torch only
where latents are read or written, so validating a request stays quick.

    <out>/<shot>.mp4                                  stitched videos
    <out>/segments/<shot>/s000.mp4                    per-segment videos
    <out>/<shot>.storyboard.png                       the macro plan's frames (--storyboard)
    <out>/.mmpl/manifest.json                         what was asked: resolved shots, profile, hashes, versions
    <out>/.mmpl/tasks/<shot>/s000-plan.safetensors    latents of a finished task (+ metadata)
    <out>/.mmpl/tasks/<shot>/s000-decode.json         record of a finished video task (file + sha256)
    <out>/.mmpl/events.jsonl                          started / finished events, append-only
    <out>/.mmpl/seeding.json, numerics.json           decisions the first worker made for the folder

Every file is written to a temporary name in its own folder, fsynced, renamed into place, and the
folder fsynced: a crash leaves either the old file or the new one, never half of one. A task file
is used only if its input hash equals the task's current hash and its content checksum verifies;
anything else is treated as absent (with a warning) and the task is computed again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from mmpl_cli import video
from mmpl_cli.errors import InputError, MMPLError, Problem

STORE_VERSION = 1
META = ".mmpl"
TMP_MARK = ".tmp-"

DONE, MISSING, INVALID, STALE = "done", "missing", "invalid", "stale"


_HOST = hashlib.sha1(os.uname().nodename.encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreError(MMPLError):
    """The disk failed us (full, read-only, gone); finished tasks stay as they are."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_checksum(tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _checksum_key(tensor_name: str) -> str:
    """Metadata key of a task file's tensor checksum ("checksum" for the latents, as files always had)."""
    return "checksum" if tensor_name == "latents" else f"checksum.{tensor_name}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _disk_errors(what: Path):
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"no space left on the device while writing {what}") from None
        raise StoreError(f"cannot write {what}: {exc.strerror or exc}") from None


class RenderStore:
    def __init__(self, root: Path, warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.meta = self.root / META
        self.warn = warn or (lambda text: None)
        self._verified: dict[str, tuple] = {}  # task id -> (hash, file stamp, result or None)

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
        if any(self.root.iterdir()):
            raise InputError(Problem(str(self.root), None, "--out",
                                     "this folder has files but is not an mmpl render folder (no .mmpl/manifest.json)",
                                     "choose an empty or new folder with --out"))

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise InputError(Problem(str(self.root), None, "", "not an mmpl render folder (no .mmpl/manifest.json)")) from None
        except (OSError, ValueError) as exc:
            raise InputError(Problem(str(self.manifest_path), None, "", f"unreadable manifest: {exc}")) from None

    def write_manifest(self, manifest: dict) -> None:
        self._write_bytes(self.manifest_path, json.dumps({**manifest, "store_version": STORE_VERSION},
                                                         indent=2, sort_keys=True).encode())

    def clean_temporary_files(self, older_than: float = 0.0) -> None:
        """Remove what an interrupted write left behind: our own temporary names whose writer is a
        dead process on this machine, or that are older than `older_than` seconds (a live worker
        elsewhere cannot be writing them any more)."""
        if not self.root.exists():
            return
        now = time.time()
        for path in self.root.rglob(f"*{TMP_MARK}*"):
            try:
                writer = path.name.split(TMP_MARK, 1)[1].split("-")
                dead_here = writer[0] == _HOST and not _alive(int(writer[1]))
                if path.is_file() and (dead_here or now - path.stat().st_mtime >= older_than):
                    path.unlink(missing_ok=True)
            except (FileNotFoundError, IndexError, ValueError):
                continue

    def seeding_decision(self, proposed: str) -> str:
        """The folder's automatic seeding choice: the first worker's `proposed` choice is recorded
        and every later worker and resume uses it, so they all run the same task graph."""
        recorded = self._first_decision("seeding.json", {"seeding": proposed})
        return recorded["seeding"] if recorded.get("seeding") in ("terminal", "midpoint") else proposed

    def numerics_decision(self, proposed: dict) -> dict:
        """The folder's numeric environment (numerics.py): the first worker's `proposed` record,
        which every later worker and resume applies, so a task's bits do not depend on its launcher."""
        from mmpl_cli.numerics import check_record

        path = self.meta / "numerics.json"
        return check_record(self._first_decision(path.name, proposed), path)

    def _first_decision(self, name: str, proposed: dict) -> dict:
        """First writer wins: record `proposed` in .mmpl/<name> unless a record exists, and return
        the record that holds for the folder. The record is written whole under a temporary name
        and linked into place (link fails if the name exists), so no worker ever reads half of one."""
        path = self.meta / name
        with _disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp_for(path)
            try:
                with open(tmp, "w") as fh:
                    json.dump(proposed, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    try:
                        record = json.loads(path.read_text())
                    except ValueError:
                        return {}  # not JSON: the caller's check says what that means
                    return record if isinstance(record, dict) else {}
                _fsync_dir(path.parent)
            finally:
                tmp.unlink(missing_ok=True)
        return proposed

    def restart(self, shot_ids: list[str]) -> None:
        """Forget every finished task and remove the videos of these shots: the explicit fresh start."""
        with _disk_errors(self.root):
            (self.meta / "seeding.json").unlink(missing_ok=True)
            (self.meta / "numerics.json").unlink(missing_ok=True)
            shutil.rmtree(self.meta / "tasks", ignore_errors=True)
            shutil.rmtree(self.root / "segments", ignore_errors=True)
            for shot_id in shot_ids:
                (self.root / f"{shot_id}.mp4").unlink(missing_ok=True)
                self.storyboard(shot_id).unlink(missing_ok=True)

    # -- atomic writes ---------------------------------------------------------------------

    def _tmp_for(self, path: Path) -> Path:
        """A temporary name in the same folder that says which host and process is writing it."""
        return path.with_name(f".{path.stem}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")

    def _commit(self, tmp: Path, path: Path) -> None:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _write_bytes(self, path: Path, data: bytes) -> None:
        with _disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp_for(path)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                self._commit(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    # -- tasks -----------------------------------------------------------------------------

    def _task_file(self, task_id: str, suffix: str) -> Path:
        shot, *rest = task_id.split("/")
        return self.meta / "tasks" / shot / ("-".join(rest) + suffix)

    def segment_video(self, shot_id: str, index: int) -> Path:
        return self.root / "segments" / shot_id / f"s{index:03d}.mp4"

    def shot_video(self, shot_id: str) -> Path:
        return self.root / f"{shot_id}.mp4"

    def storyboard(self, shot_id: str) -> Path:
        return self.root / f"{shot_id}.storyboard.png"

    def write_storyboard(self, shot_id: str, png: bytes) -> Path:
        path = self.storyboard(shot_id)
        self._write_bytes(path, png)
        return path

    def state(self, task_id: str, task_hash: str) -> str:
        """done / missing / invalid (unreadable or altered) / stale (made from other inputs)."""
        return self._load(task_id, task_hash, quiet=True)[0]

    def load(self, task_id: str, task_hash: str) -> dict | None:
        """The finished result of a task with this hash, or None (warning, once per version of the
        file, if it was unusable). A file is read and verified once per (size, mtime), so workers
        can poll cheaply and a verified result is not read again when a dependent task needs it."""
        files = [self._task_file(task_id, ".safetensors"), self._task_file(task_id, ".json")]
        try:
            stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in files)
        except OSError:
            return None
        if stamp == (None, None):
            return None
        cached = self._verified.get(task_id)
        if cached is None or cached[:2] != (task_hash, stamp):
            state, result = self._load(task_id, task_hash, quiet=False)
            cached = (task_hash, stamp, result if state == DONE else None)
            self._verified[task_id] = cached
        return cached[2]

    def is_done(self, task_id: str, task_hash: str) -> bool:
        return self.load(task_id, task_hash) is not None

    def _load(self, task_id: str, task_hash: str, quiet: bool) -> tuple[str, dict | None]:
        latents_file = self._task_file(task_id, ".safetensors")
        record_file = self._task_file(task_id, ".json")
        if latents_file.exists():
            return self._load_latents(task_id, latents_file, task_hash, quiet)
        if record_file.exists():
            return self._load_record(task_id, record_file, task_hash, quiet)
        return MISSING, None

    def _invalid(self, task_id: str, why: str, quiet: bool) -> tuple[str, None]:
        if not quiet:
            self.warn(f"warning: {task_id}: {why}; computing it again")
        return INVALID, None

    def _load_latents(self, task_id, path, task_hash, quiet):
        from safetensors import safe_open  # torch only where latents are read or written

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - any unreadable file is simply not a result
            return self._invalid(task_id, f"unreadable task file ({type(exc).__name__})", quiet)
        if "latents" not in tensors or any(meta.get(_checksum_key(key)) != tensor_checksum(t) for key, t in tensors.items()):
            return self._invalid(task_id, "task file altered (checksum mismatch)", quiet)
        if meta.get("hash") != task_hash:
            return STALE, None
        return DONE, tensors

    def _load_record(self, task_id, path, task_hash, quiet):
        try:
            record = json.loads(path.read_text())
            target = self.root / record["file"]
        except (OSError, ValueError, KeyError, TypeError):
            return self._invalid(task_id, "unreadable task record", quiet)
        if record.get("hash") != task_hash:
            return STALE, None
        if not target.exists():
            return MISSING, None
        if sha256_file(target) != record.get("sha256"):
            return self._invalid(task_id, f"{record['file']} was altered", quiet)
        return DONE, {"path": target}

    def save(self, task_id: str, task_hash: str, result: dict, fps: int) -> dict:
        """Persist a task's result; returns it as later loads will see it."""
        if "latents" in result:
            from safetensors.torch import save as safetensors_bytes

            # "latents", and any state a chained task hands on (progressive: its noisy window)
            tensors = {key: value.detach().cpu().float().contiguous() for key, value in result.items()}
            meta = {"task": task_id, "hash": task_hash, **{_checksum_key(k): tensor_checksum(t) for k, t in tensors.items()}}
            self._write_bytes(self._task_file(task_id, ".safetensors"), safetensors_bytes(tensors, metadata=meta))
            return tensors
        path: Path = result["target"]
        with _disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp_for(path)
            try:
                if "frames" in result:
                    video.write_mp4(result["frames"], tmp, fps)
                else:
                    video.stitch(result["parts"], tmp, fps)
                self._commit(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        record = {"task": task_id, "hash": task_hash, "file": str(path.relative_to(self.root)),
                  "sha256": sha256_file(path)}
        self._write_bytes(self._task_file(task_id, ".json"), json.dumps(record, indent=1).encode())
        return {"path": path}

    # -- claims: which worker runs which task --------------------------------------------
    #
    # A claim is a file <task>.claim.<generation> created with O_EXCL, so one worker wins it. Its
    # holder touches it while the task runs (a heartbeat). A claim not touched for `timeout`
    # seconds belongs to a dead worker: another worker takes it over by creating the next
    # generation, which again only one can do. Claims live in the render folder, so this works
    # across processes, machines and SLURM array tasks on a shared filesystem.

    def _claims(self, task_id: str) -> list[tuple[int, Path]]:
        base = self._task_file(task_id, ".claim")
        base = self.meta / "claims" / base.relative_to(self.meta / "tasks")
        if not base.parent.exists():
            return []
        found = []
        for path in base.parent.glob(base.name + ".*"):
            suffix = path.name[len(base.name) + 1:]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def try_claim(self, task_id: str, worker: str, timeout: float) -> Path | None:
        """Claim a task for `worker`; returns the claim file, or None if a live worker holds it."""
        claims = self._claims(task_id)
        if claims:
            generation, current = claims[-1]
            try:
                age = time.time() - current.stat().st_mtime
                holder = json.loads(current.read_text() or "{}")
            except FileNotFoundError:
                return None  # being released right now; look again later
            except ValueError:
                holder = {}  # written a moment ago, or cut short by a crash: judged by its age
            dead_here = holder.get("host") == os.uname().nodename and not _alive(int(holder.get("pid", 0)))
            if age < timeout and not dead_here:
                return None
            why = "its process is gone" if dead_here else f"no heartbeat for {age:.0f} s"
            self.warn(f"{task_id}: taking over from worker {holder.get('worker', '?')} ({why})")
            generation += 1
        else:
            generation = 0
        base = self._task_file(task_id, ".claim")
        path = self.meta / "claims" / base.relative_to(self.meta / "tasks")
        path = path.with_name(f"{path.name}.{generation}")
        with _disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "w") as fh:
                json.dump({"worker": worker, "pid": os.getpid(), "host": os.uname().nodename,
                           "time": time.time()}, fh)
        return path

    def holds(self, claim: Path, task_id: str) -> bool:
        """Whether this claim is still the newest one (nobody took the task over)."""
        claims = self._claims(task_id)
        return bool(claims) and claims[-1][1] == claim

    @staticmethod
    def heartbeat(claim: Path) -> None:
        try:
            os.utime(claim)
        except FileNotFoundError:
            pass

    def release(self, task_id: str) -> None:
        for _, path in self._claims(task_id):
            path.unlink(missing_ok=True)

    # -- events ----------------------------------------------------------------------------

    def log(self, event: str, task_id: str, task_hash: str, **extra) -> None:
        """Append one line; a line cut short by a crash is skipped when read."""
        line = json.dumps({"event": event, "task": task_id, "hash": task_hash, "pid": os.getpid(),
                           "time": round(time.time(), 3), **extra}) + "\n"
        path = self.meta / "events.jsonl"
        with _disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(line)

    def events(self) -> list[dict]:
        path = self.meta / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def computed_counts(self) -> dict[str, int]:
        """How many times each task was computed to the end, over the folder's whole history."""
        counts: dict[str, int] = {}
        for e in self.events():
            if e.get("event") == "finished":
                counts[e["task"]] = counts.get(e["task"], 0) + 1
        return counts
