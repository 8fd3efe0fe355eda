"""A render folder's contents are untrusted data: records that point outside it, at devices, FIFOs
or symlinks; records, claims, decisions and manifests of the wrong type; claims from the future;
symlinks that would lead writes outside. None hangs (each render runs under a timeout), none
certifies a foreign file, each recomputes or refuses with exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import run_cli, videos
from mmpl_cli.files import HOST

TIMEOUT = 180  # seconds: a tampered folder must never make a render wait for longer


def _copy(reference_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out, symlinks=True)
    return out


def _render(shots_file, tiny_model_dir, out):
    return run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir), timeout=TIMEOUT)


@contextmanager
def _deep_tree(top: Path, levels: int = 1200) -> Iterator[Path]:
    """`levels` folders nested under `top`, removed level by level after (os.makedirs, rglob, rmtree and
    pytest's own clean-up recurse once per level, and fail on them), also when the test fails."""
    made = []
    try:
        for _ in range(levels):
            top = top / "d"
            top.mkdir()
            made.append(top)
        yield made[0]
    finally:
        for folder in reversed(made):
            if folder.exists():
                folder.rmdir()


def _outside_untouched(tmp_path: Path, before: dict) -> None:
    after = {str(p): p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "out"}
    assert after == before  # nothing written beside the render folder


@pytest.mark.slow
@pytest.mark.parametrize("tampering", [("absolute", "symlink", "device"), ("dotdot", "fifo", "absolute")])
def test_a_record_naming_something_outside_or_odd_is_not_certified(tampering, shots_file, tiny_model_dir,
                                                                   reference_dir, tmp_path):
    """Each case tampers with three records at once (both segments' and the stitch's): a record naming
    an absolute path or ../ outside the folder, a symlink to a foreign file, /dev/zero, a FIFO."""
    out = _copy(reference_dir, tmp_path)
    foreign = tmp_path / "foreign.mp4"
    foreign.write_bytes(b"not the segment this folder made")
    sha = hashlib.sha256(foreign.read_bytes()).hexdigest()
    originals = {}
    for task, where in zip(("s000-decode", "s001-decode", "stitch"), tampering):
        record_path = out / ".mmpl/tasks/k" / f"{task}.json"
        record = json.loads(record_path.read_text())
        originals[record_path] = record["file"]
        target = out / record["file"]
        if where == "symlink":
            target.unlink()
            target.symlink_to(foreign)
        if where == "fifo":
            target.unlink()
            os.mkfifo(target)
        named = {"absolute": str(foreign), "dotdot": "../foreign.mp4", "device": "/dev/zero"}.get(where, record["file"])
        record_path.write_text(json.dumps({**record, "file": named, "sha256": sha}))
    before = {str(p): p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "out"}
    started = time.monotonic()
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < TIMEOUT
    assert "Traceback" not in proc.stderr
    for task in ("k/s000/decode", "k/s001/decode", "k/stitch"):
        assert f"{task}: task record names" in proc.stdout or f"{task}: task file" in proc.stdout, proc.stdout
    assert videos(out) == videos(reference_dir)  # the folder's own videos, made again
    for record_path, file in originals.items():
        fixed = json.loads(record_path.read_text())
        assert fixed["file"] == file and not (out / file).is_symlink()
    assert foreign.read_bytes() == b"not the segment this folder made"
    _outside_untouched(tmp_path, before)


@pytest.mark.slow
def test_records_claims_and_decisions_of_the_wrong_type_are_recomputed_or_refused(shots_file, tiny_model_dir,
                                                                                  reference_dir, tmp_path):
    out = _copy(reference_dir, tmp_path)
    tasks = out / ".mmpl/tasks/k"
    for name, text in (("s000-decode.json", "[" * 30000), ("s001-decode.json", '{"file": 1, "hash": [], "sha256": null}'),
                       ("stitch.json", '"a string"')):
        (tasks / name).write_text(text)
    (tasks / "s001-plan.safetensors").write_bytes(b"\x00" * 64)  # not a safetensors file
    claims = out / ".mmpl/claims"
    claims.mkdir(parents=True, exist_ok=True)
    for name, text in (("k.s000-plan.claim.0", "[1, 2]"), ("k.s001-plan.claim.0", '{"pid": "x", "host": 3}'),
                       ("k.s000-initial.claim.0", "\x00\xff garbage"), ("k.s000-decode.claim.0", "[" * 4000)):
        (claims / name).write_text(text, errors="surrogateescape")
        os.utime(claims / name, (time.time() - 1000, time.time() - 1000))
    (out / ".mmpl/events.jsonl").write_text('[1]\n{"event": "finished"}\n"x"\n{"task": 5}\n' + "[" * 100000 + "\n")
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert videos(out) == videos(reference_dir)
    # a decision of the wrong type is refused with exit 2, naming the file
    (out / ".mmpl/numerics.json").write_text("[]")
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 2 and "numerics.json" in proc.stderr and "Traceback" not in proc.stderr
    # a manifest of the wrong shape: status says so, exit 2
    for text in ("[]", '{"shots": 3, "profile": {}}', '{"shots": [{"tasks": [1]}]}', "[" * 100000):
        (out / ".mmpl/manifest.json").write_text(text)
        proc = run_cli("status", str(out))
        assert proc.returncode == 2 and "manifest.json" in proc.stderr and "Traceback" not in proc.stderr, text


@pytest.mark.slow
def test_a_file_or_folder_standing_where_mmpl_writes_is_bad_input(shots_file, tiny_model_dir, reference_dir, tmp_path):
    """A folder where a task's record goes, a file where the claims or a shot's segments go: the write
    that meets it stops with exit 2 naming what is in the way (every resume would meet it again), also
    through `--workers`, whose parent then exits 2 as well; what was planted is left alone."""
    out = _copy(reference_dir, tmp_path)
    record, claims, segments = out / ".mmpl/tasks/k/s001-decode.json", out / ".mmpl/claims", out / "segments/k"
    record.unlink()
    cases = ((record, record.mkdir, record.rmdir, []),  # a folder at a task record's place
             (claims, lambda: claims.write_text("x"), claims.unlink, []),  # files at folders' places
             (segments, lambda: segments.write_text("x"), None, ["--workers", "2"]))
    for blocked, plant, remove, extra in cases:
        shutil.rmtree(blocked, ignore_errors=True)
        plant()
        proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir), *extra,
                       timeout=TIMEOUT)
        assert proc.returncode == 2, proc.stderr
        assert f"{blocked}: a {'folder' if blocked.is_dir() else 'file'} stands where mmpl" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "resume with" not in proc.stderr
        if remove:
            remove()
    assert segments.read_text() == "x" and (out / "k.mp4").read_bytes() == (reference_dir / "k.mp4").read_bytes()


@pytest.mark.slow
def test_a_claim_from_the_future_is_taken_over(shots_file, tiny_model_dir, reference_dir, tmp_path):
    out = _copy(reference_dir, tmp_path)
    (out / ".mmpl/tasks/k/s001-populate_stage_two.safetensors").unlink()  # to be computed again, if it can be claimed
    claim = out / ".mmpl/claims/k.s001-populate_stage_two.claim.0"
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"worker": "far", "pid": 1, "host": "elsewhere", "time": 0}))
    os.utime(claim, (time.time() + 10**7, time.time() + 10**7))  # months ahead
    started = time.monotonic()
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60  # not the 120 s claim timeout, let alone forever
    assert "heartbeat lies in the future" in proc.stdout
    assert "k/s001/populate_stage_two done" in proc.stdout
    assert videos(out) == videos(reference_dir)


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["segments", ".mmpl/tasks", ".mmpl/claims"])
def test_a_symlink_planted_in_the_folder_does_not_lead_writes_outside(planted, shots_file, tiny_model_dir, tmp_path):
    """Nor removals: through a symlinked claims folder, claiming took a user's file named like a stale
    claim over (and removed it), and the clean-up removed one named like a dead process's temporary file."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    users = [elsewhere / "k.s000-initial.claim.0", elsewhere / f".notes.tmp-{HOST}-{2**22 - 1}-x.txt"]
    for path in users:
        path.write_text("a user's file")
        os.utime(path, (1e9, 1e9))
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / ".mmpl").mkdir(exist_ok=True)
    (out / ".mmpl/manifest.json").write_text('{"store_version": 1}')  # an mmpl folder, so --out is accepted
    (out / planted).symlink_to(elsewhere, target_is_directory=True)
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 2, proc.stderr
    assert "leads outside the render folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(elsewhere.iterdir()) == sorted(users) and all(p.read_text() == "a user's file" for p in users)


@pytest.mark.slow
def test_impossible_pids_long_generations_and_deep_folders_in_the_folder_are_not_errors(shots_file, tiny_model_dir,
                                                                                          reference_dir, tmp_path):
    """Each ended every render of the folder with exit 1: a temporary name whose pid overflows C's
    long (OverflowError from os.kill), a stale claim whose next generation's name would pass 255
    bytes, a tree 1,200 folders deep (RecursionError in the start's clean-up)."""
    out = _copy(reference_dir, tmp_path)
    (out / ".mmpl/tasks/k/stitch.json").unlink()  # the stitch is computed again: it must be claimed
    claims, events = out / ".mmpl/claims", out / ".mmpl/events"
    claims.mkdir(exist_ok=True)
    events.mkdir(exist_ok=True)
    for folder in (claims, events):
        (folder / f".worker.claim.tmp-{HOST}-{10**20}-deadbeef.claim").write_text("{}")
    long = claims / ("k.stitch.claim." + "9" * 200)
    long.write_text("{}")
    os.utime(long, (1e9, 1e9))
    with _deep_tree(claims):
        proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    assert "k/stitch done" in proc.stdout
    assert long.exists()  # not a claim: left alone
    assert videos(out) == videos(reference_dir)


def test_something_planted_at_a_workers_event_log_is_refused_without_waiting(tmp_path):
    """The event log's name is foreseeable (host, pid, worker): a FIFO there made the worker's first
    event wait for a reader forever; it, or a folder, is bad input (exit 2), found at once."""
    import threading

    from mmpl_cli.errors import InputError
    from mmpl_cli.store import RenderStore

    for plant in (os.mkfifo, os.mkdir):
        store = RenderStore(tmp_path / plant.__name__, worker="w")
        log = store.event_log
        log.folder.mkdir(parents=True)
        plant(log.path)
        raised = []
        thread = threading.Thread(target=lambda: raised.append(pytest.raises(InputError, log.log, "started", "k/x", "h")),
                                  daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert raised and "event log" in str(raised[0].value), plant
    store = RenderStore(tmp_path / "plain", worker="w")
    store.event_log.log("finished", "k/x", "h")
    with open(store.event_log.path, "a") as fh:  # a line far longer than any event, then one more event
        fh.write('{"event": "finished", "task": "k/y", "pad": "' + "x" * (1 << 17) + '"}\n')
    store.event_log.log("finished", "k/z", "h")
    assert store.event_log.computed_counts() == {"k/x": 1, "k/z": 1}


def test_a_restart_that_meets_folders_too_deep_to_remove_says_so(tmp_path):
    from mmpl_cli.errors import InputError
    from mmpl_cli.store import RenderStore

    store = RenderStore(tmp_path / "out")
    (store.meta / "tasks" / "k").mkdir(parents=True)
    with _deep_tree(store.meta / "tasks" / "k"), pytest.raises(InputError, match="nested too deep"):
        store.restart(["k"])


@pytest.mark.slow
def test_a_video_record_naming_another_file_of_the_folder_is_not_certified(shots_file, tiny_model_dir,
                                                                           reference_dir, tmp_path):
    """A record must name its own task's file: the stitch's record pointed at a segment's video (with
    its real checksum) kept a missing or garbage shot video "done" for ever, and a decode record whose
    name held a line break slipped an outside video into ffmpeg's list of parts."""
    out = _copy(reference_dir, tmp_path)
    record_path = out / ".mmpl/tasks/k/stitch.json"
    segment = "segments/k/s000.mp4"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "file": segment,
                                       "sha256": hashlib.sha256((out / segment).read_bytes()).hexdigest()}))
    (out / "k.mp4").write_text("garbage")
    proc = run_cli("status", str(out))
    assert "1 task(s) remain" in proc.stdout, proc.stdout
    proc = _render(shots_file, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert "k/stitch: task record names another file" in proc.stdout
    assert videos(out) == videos(reference_dir)


def test_a_manifest_whose_segments_are_not_numbers_is_bad_input_in_text_too(reference_dir, tmp_path):
    out = _copy(reference_dir, tmp_path)
    manifest = json.loads((out / ".mmpl/manifest.json").read_text())
    for task in manifest["shots"][0]["tasks"]:
        task["segment"] = "x" if task["segment"] is not None else None
    (out / ".mmpl/manifest.json").write_text(json.dumps(manifest))
    for extra in ([], ["--json"]):
        proc = run_cli("status", str(out), *extra)
        assert proc.returncode == 2 and "manifest.json" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_restart_meets_a_fifo_where_its_folders_go_at_once_and_removes_nothing(tmp_path):
    """shutil.rmtree opens what it is given before asking whether it is a folder: on a FIFO it waited
    for a writer for ever, after the folder's decisions were removed."""
    import threading

    from mmpl_cli.errors import InputError
    from mmpl_cli.store import RenderStore

    store = RenderStore(tmp_path / "out")
    store.meta.mkdir(parents=True)
    store.decision("seeding").write_text("{}")
    os.mkfifo(store.root / "segments")
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(InputError, store.restart, ["k"])), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert raised and "FIFO" in str(raised[0].value)
    assert store.decision("seeding").exists()


def test_a_manifest_naming_a_symlink_loop_as_its_shot_list_binds_nothing(shots_file, reference_dir, tmp_path):
    from mmpl_cli.request import check_owner
    from mmpl_cli.shotlist import load_shot_list
    from mmpl_cli.store import RenderStore

    out = _copy(reference_dir, tmp_path)
    (out / ".mmpl/owner.json").unlink()  # a folder from before owners were recorded: its manifest names the list
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    manifest = json.loads((out / ".mmpl/manifest.json").read_text())
    manifest["shot_list"]["path"] = str(tmp_path / "loop" / "x")
    (out / ".mmpl/manifest.json").write_text(json.dumps(manifest))
    check_owner(RenderStore(out), load_shot_list(shots_file))  # the same shots: no error (was RuntimeError)


def test_a_task_file_holding_nan_with_true_checksums_is_computed_again(tmp_path):
    """No task saves NaN or inf (a task whose output is not finite fails): one read back was planted,
    and its checksums say nothing (anyone can compute them). It made a changed video, "done"."""
    import torch

    from mmpl_cli.results import Latents
    from mmpl_cli.store import RenderStore

    store = RenderStore(tmp_path / "out")
    for value in (float("nan"), float("inf"), 1.0):
        latents = torch.zeros(16, 3, 4, 4)
        latents[0, 1, 2, 3] = value
        store.save("k/s000/plan", "h", Latents(latents))
        warned = []
        loaded = RenderStore(tmp_path / "out", warn=warned.append).load("k/s000/plan", "h")
        if value == 1.0:
            assert loaded is not None and torch.equal(loaded.latents, latents) and not warned
        else:
            assert loaded is None and "holds NaN or infinity" in warned[0], value
