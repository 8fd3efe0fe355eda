"""Which worker runs which task, and the decisions the first worker makes for a render folder.

A claim is a file `<claims>/<shot>.<task>.claim.<generation>` made by a hard link, which fails if
the name exists (as O_EXCL would), so one worker wins it. What it links is the claiming process's
own record (worker, pid, host), written whole once per render folder under a temporary name there: a
claim costs a link and its release an unlink, and no file is created or freed per task or per shot.
Its holder touches it while the task runs (a heartbeat: the touch is the record's, which is also
touched when linked). A claim not touched for `timeout` seconds, or whose process is gone from this
machine, belongs to a dead worker: another worker takes it over by creating the next generation,
which again only one can do, and removes the claims it took over. A release removes the worker's own
claim only, checked by the record in it: a stalled worker that was taken over does not remove its
successor's. Claims live in the render folder, so this works across processes, machines and SLURM
array tasks on a shared filesystem.

A decision (`.mmpl/seeding.json`, `.mmpl/numerics.json`) is first-writer-wins: written whole under a
temporary name and hard-linked into place, which fails if the name exists, so every worker and
every resume reads the one record the first worker made, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from mmpl_cli.files import (MAX_RECORD_BYTES, PID_LIMIT, alive, clean_temporary_files, disk_errors, fsync_dir, load_json,
                            parse_json, sha256_file, temporary_name)
from mmpl_cli.numerics import check_record
from mmpl_cli.terms import SEEDINGS

MAX_GENERATION_DIGITS = 9  # a claim's generation counts takeovers: a longer one was planted, and the next
# generation's name could pass the file system's 255 bytes (every render of the folder failed); not a claim
FUTURE_SLACK = 60.0  # seconds a claim's time may lie ahead of ours (clock skew between machines)
FRESH = 2.0  # a claim linked or touched this recently (its time this close to ours) is held, without
# reading whose it is (with eight workers, most asks meet a claim made milliseconds before): a worker of
# this machine that died is taken over this much later than at once


class Claims:
    def __init__(self, folder: Path, warn: Callable[[str], None] | None = None):
        self.folder = Path(folder)  # the render folder's claims (RenderStore.claims_folder)
        self.warn = warn or (lambda text: None)
        self._records: dict[str, Path] = {}  # worker name -> the record its claims link
        self._held: dict[Path, str] = {}  # a claim this process made -> the name of the record it linked

    def _record(self, worker: str, claim: Path) -> Path:
        """This process's record for `worker` in the claims folder (a link stays within one folder:
        BeeGFS before 7.4 and AFS refuse others, so every claim of a render lies in one), written whole
        once under a temporary name (a dead process's is cleaned like any temporary file) and touched,
        so a claim linked to it is fresh. One folder, not one per shot: a worker made a record in each
        shot folder it claimed in, freed at its end."""
        record = self._records.get(worker)
        if record is not None:
            try:
                os.utime(record)
                return record
            except OSError:  # cleaned away by another worker's start (untouched for the claim timeout): again
                self._records.pop(worker)
        with disk_errors(claim):
            self.folder.mkdir(parents=True, exist_ok=True)
            record = temporary_name(self.folder / "worker.claim")
            try:
                record.write_text(json.dumps({"worker": worker, "pid": os.getpid(), "host": os.uname().nodename,
                                              "time": time.time(), "record": record.name}))
            except BaseException:  # a full disk leaves no empty record behind
                record.unlink(missing_ok=True)
                raise
        self._records[worker] = record
        return record

    def close(self) -> None:
        """Remove this process's records (its claims are released already), and those of processes
        of this machine that are gone (a killed worker's)."""
        for record in self._records.values():
            record.unlink(missing_ok=True)
        self._records.clear()
        try:
            clean_temporary_files(self.folder, older_than=float("inf"))
        except OSError:  # an unreadable folder: what is left there is cleaned by a later start
            pass

    def _base(self, task_id: str) -> Path:
        shot, *rest = task_id.split("/")  # a shot id has no "."
        return self.folder / f"{shot}.{'-'.join(rest)}.claim"

    def _claims(self, task_id: str) -> list[tuple[int, Path]]:
        """The task's claims, oldest generation first: one listing of the claims folder, names
        compared as strings (a worker asks this several times a task; pathlib's glob cost more than
        the rest of a claim). Other names there, such as `x.claim.²` or a generation of ten digits,
        are not claims."""
        try:
            names = os.listdir(self.folder)
        except OSError:  # no claim made in this render folder yet (or not a folder: then claiming says why)
            return []
        prefix = self._base(task_id).name + "."
        return sorted((int(name[len(prefix):]), self.folder / name) for name in names
                      if name.startswith(prefix) and name[len(prefix):].isascii() and name[len(prefix):].isdigit()
                      and len(name) - len(prefix) <= MAX_GENERATION_DIGITS)

    def try_claim(self, task_id: str, worker: str, timeout: float) -> Path | None:
        """Claim a task for `worker`; returns the claim file, or None if a live worker holds it."""
        claims = self._claims(task_id)
        if claims:
            generation, current = claims[-1]
            try:
                info = os.lstat(current)
            except OSError:  # being released right now, or the file system failed for a while: look again later
                return None
            age = time.time() - info.st_mtime
            # a folder, symlink, FIFO or device was never written by a worker (claims are files
            # linked into place whole): not a claim, taken over at once (and never opened)
            planted = not stat.S_ISREG(info.st_mode)
            if not planted and abs(age) < min(FRESH, timeout):
                return None  # linked or touched just now: not read (whether its process is gone is asked later)
            holder = {} if planted else _holder(current)
            pid = holder.get("pid")
            dead_here = (holder.get("host") == os.uname().nodename and isinstance(pid, int) and 0 < pid < PID_LIMIT
                         and not alive(pid))
            future = age < -FUTURE_SLACK  # a heartbeat from the future is no heartbeat: a wrong clock or tampering
            if not future and age < timeout and not dead_here and not planted:
                return None
            why = ("its claim is not a file" if planted else "its process is gone" if dead_here
                   else "its heartbeat lies in the future" if future else f"no heartbeat for {age:.0f} s")
            self.warn(f"{task_id}: taking over from worker {holder.get('worker', '?')} ({why})")
            generation += 1
        else:
            generation = 0
        base = self._base(task_id)
        path = base.with_name(f"{base.name}.{generation}")
        with disk_errors(path):
            for attempt in (1, 2):
                record = self._record(worker, path)
                try:
                    os.link(record, path)
                except FileExistsError:
                    if not self._linked(path, record):
                        return None
                except FileNotFoundError:  # the record was cleaned away just now: written again, once
                    if attempt == 2 or os.path.lexists(record):
                        raise
                    self._records.pop(worker, None)
                    continue
                self._held[path] = record.name
                mine = self._still_mine(path)  # False: removed at once by a worker taking over from
                if not mine:  # what it listed before; None: cannot be told (NFS failing for a while)
                    self._held.pop(path, None)
                    if mine is None:  # left to age out, not held
                        self._new_record()
                    return None
                for _, older in claims:  # the holders taken over from are done with: their claims go now
                    with contextlib.suppress(OSError):  # gone already, or a planted folder: it stays
                        older.unlink()
                return path
        return None

    @staticmethod
    def _linked(claim: Path, record: Path) -> bool:
        """Whether a link that failed as existing made `claim` all the same: over NFS a link whose reply
        was lost is sent again and answered EEXIST. Such a claim links this process's record, which its
        other claims keep fresh, so it would hold the task from every worker until this one ends."""
        try:
            return _read_claim(claim)[1].get("record") == record.name
        except OSError:
            return False

    def _still_mine(self, claim: Path) -> bool | None:
        """Whether `claim` still holds the record this process linked there (record names are
        unique: host, process, random part). Its inode number proves nothing: one freed with the
        last link of a cleaned record comes back as another worker's record, linked under the same
        name (ext4 reuses it at once), and some file systems do not keep inode numbers stable.
        False: it is gone. None: it is there but not this process's any more (another worker's
        claim made afresh under its name, or this process's record written over by someone), or it
        cannot be told (NFS failing for a while): the caller leaves it and links a new record."""
        held = self._held.get(claim)
        if held is None:
            return False
        try:
            info, record = _read_claim(claim)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):  # a planted folder or FIFO in its place
            return False
        return True if record.get("record") == held else None

    def _new_record(self) -> None:
        """Link this process's next claims to a new record: what still links the old one is no longer
        touched, so it ages out and is taken over after the claim timeout (and a record written over
        by someone is not linked again, or every result would be dropped)."""
        for path in self._records.values():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        self._records.clear()

    def holds(self, claim: Path, task_id: str) -> bool:
        """Whether this claim is still the newest one (nobody took the task over)."""
        claims = self._claims(task_id)
        return bool(claims) and claims[-1][1] == claim and self._still_mine(claim) is True

    @staticmethod
    def heartbeat(claim: Path) -> None:
        try:
            os.utime(claim)
        except FileNotFoundError:
            pass

    def release(self, claim: Path) -> None:
        """Remove this process's claim, if it still is. Not a newer generation's: that is another
        worker's, which took the task over from this one when it stalled (and removed this claim
        then); removing it would let a third worker compute the task again. Never fails: a claim
        that cannot be removed ages out (a task still to do is taken over after the claim timeout;
        one that is done leaves a small file)."""
        mine = self._still_mine(claim)
        if mine:
            try:
                claim.unlink(missing_ok=True)
            except OSError:
                mine = None
        if mine is None:  # left where it is: this worker's later claims must not keep it fresh
            self._new_record()
        self._held.pop(claim, None)


def _read_claim(path: Path) -> tuple[os.stat_result, dict]:
    """A claim's lstat and the record in it, never opened unless a plain file (a planted FIFO could
    block). OSError only from the lstat (FileNotFoundError: no claim there)."""
    info = os.lstat(path)
    return info, _holder(path) if stat.S_ISREG(info.st_mode) else {}


def _holder(path: Path) -> dict:
    """The record in a claim known to be a plain file: {} if it cannot be read or is no record (cut
    short by a crash, planted)."""
    try:
        with open(path, "rb") as fh:
            record = parse_json(fh.read(4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# -- first-writer-wins decisions -------------------------------------------------------------


def first_decision(path: Path, proposed: dict) -> dict:
    """Record `proposed` at `path` unless a record exists, and return the record that holds."""
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        try:
            with open(tmp, "w") as fh:
                json.dump(proposed, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return read_decision(path) or {}
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return proposed


def read_decision(path: Path) -> dict | None:
    """The record at `path`: None if there is none, {} if it is not a JSON object (damaged or
    planted: the caller's check says what that means)."""
    try:  # never open a planted FIFO or device: it could block
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return {}
        record = load_json(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def shot_list_identity(path: Path) -> dict:
    """What binds a render folder to its shot list: the file's resolved path and its content."""
    path = Path(path).resolve()
    try:
        digest = sha256_file(path) if path.is_file() else None
    except OSError:
        digest = None
    return {"shot_list": str(path), "sha256": digest}


def owner_decision(path: Path, identity: dict, folder: Path, record: bool = True) -> None:
    """A render folder belongs to the first shot list that rendered into it: its manifest, its
    videos (<shot id>.mp4) and its tasks are that list's. Another shot list (another path, and
    other content) is refused, so two lists that both have a shot `intro` never make one video for
    two requests. The same file edited, or its unchanged copy elsewhere, is the same owner.
    With record=False only checks (request.check: nothing written)."""
    held = first_decision(path, identity) if record else read_decision(path)
    if held is None or held == identity:
        return
    if held.get("shot_list") == identity["shot_list"] or (identity["sha256"] and held.get("sha256") == identity["sha256"]):
        return
    from mmpl_cli.errors import InputError, Problem

    owner = held.get("shot_list") if isinstance(held.get("shot_list"), str) else None
    why = (f"this render folder belongs to the shot list {owner}" if owner
           else f"this render folder's owner record ({path.name}) is damaged")
    raise InputError(Problem(str(folder), None, "--out",
                             f"{why}; {identity['shot_list']} cannot render into it "
                             "(the same shot id in both would make one video for two requests)",
                             "use another --out, or --restart to give the folder to this shot list"))


def seeding_decision(path: Path, proposed: str) -> str:
    """The folder's automatic seeding choice: the first worker's `proposed` choice is recorded and
    every later worker and resume uses it, so they all run the same task graph."""
    recorded = first_decision(path, {"seeding": proposed})
    return recorded["seeding"] if recorded.get("seeding") in SEEDINGS else proposed


def numerics_decision(path: Path, proposed: dict) -> dict:
    """The folder's numeric environment (numerics.py): the first worker's `proposed` record, which
    every later worker and resume applies, so a task's bits do not depend on its launcher."""
    return check_record(first_decision(path, proposed), path)
