"""Batches at farm scale, counted rather than timed (benchmarks/scale.py times them): a worker holds
only the latents its pending tasks need, every worker's events are kept whole, and a weight file
retrained in place invalidates what it made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, events, run_cli, videos
from mmpl_cli.worklist import HELD_RESULTS

LONG = """version: 1
defaults: {steps: 1, seed: 4}
shots:
  - {id: a, prompt: "a red ball", duration: 24}
  - {id: b, prompt: "a blue ball", duration: 16}
"""


def _pending_need(manifest: dict, finished_order: list[str]) -> list[int]:
    """After each finished task, how many latent results a task not yet done still reads: the
    most a worker should hold then."""
    tasks = {t["id"]: t for shot in manifest["shots"] for t in shot["tasks"]}
    readers: dict[str, list[str]] = {tid: [] for tid in tasks}
    for tid, task in tasks.items():
        for dep in task["deps"]:
            readers[dep].append(tid)
    latent = {tid for tid, t in tasks.items() if t["kind"] not in ("decode", "stitch")}
    done: set[str] = set()
    need = []
    for tid in finished_order:
        done.add(tid)
        need.append(sum(1 for d in done & latent if any(r not in done for r in readers[d])))
    return need


@pytest.mark.slow
def test_a_worker_holds_only_the_latents_pending_tasks_read(tiny_model_dir, tmp_path):
    import yaml

    from mmpl_cli.profiles import builtin_profiles_dir

    shots, out, profile = tmp_path / "long.yaml", tmp_path / "out", tmp_path / "small.yaml"
    shots.write_text(LONG)
    small = yaml.safe_load((builtin_profiles_dir() / "tiny.yaml").read_text())  # 32x32: decoding is most of the time
    small["video"].update(width=32, height=32)
    profile.write_text(yaml.safe_dump({**small, "name": "tiny-32"}))
    proc = run_cli("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir), "--seeding", "terminal",
                   "--profile", str(profile))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / ".mmpl/manifest.json").read_text())
    finished = [e for e in events(out) if e["event"] == "finished"]
    held = [e["held"] for e in finished]
    need = _pending_need(manifest, [e["task"] for e in finished])
    latent_tasks = sum(1 for s in manifest["shots"] for t in s["tasks"] if t["kind"] not in ("decode", "stitch"))
    segments = sum(s["segments"] for s in manifest["shots"])
    assert segments >= 9 and len(finished) == sum(len(s["tasks"]) for s in manifest["shots"])
    assert all(h <= n for h, n in zip(held, need)), list(zip(held, need))
    assert held[-1] == 0  # the last stitch: nothing is read any more
    assert max(held) <= HELD_RESULTS < latent_tasks  # the old worker kept every one of them to the end
    assert max(need) > HELD_RESULTS  # planning chains first: more is pending than a worker keeps


def _event_writer(folder: Path, worker: str, count: int, go: Path) -> subprocess.Popen:
    code = f"""
import os, sys, time
from pathlib import Path
from mmpl_cli.store import RenderStore
store = RenderStore(Path({str(folder)!r}), worker={worker!r})
while not Path({str(go)!r}).exists():
    time.sleep(0.001)
pad = "x" * 6000  # longer than PIPE_BUF: one shared O_APPEND file could tear such lines on NFS
for i in range({count}):
    store.event_log.log("finished", f"{worker}/t{{i:05d}}", "h", worker={worker!r}, pad=pad, i=i)
"""
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def test_two_workers_writing_events_at_once_lose_and_tear_nothing(tmp_path):
    folder, go, count = tmp_path / "render", tmp_path / "go", 2000
    (folder / ".mmpl").mkdir(parents=True)
    writers = [_event_writer(folder, name, count, go) for name in ("w0", "w1")]
    time.sleep(1.0)  # both import and wait; then they write at the same moment
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    from mmpl_cli.store import RenderStore

    store = RenderStore(folder)
    assert len(list((folder / ".mmpl/events").glob("*.jsonl"))) == 2  # one file per process
    logged = store.event_log.read()
    assert len(logged) == 2 * count
    for name in ("w0", "w1"):
        mine = [e for e in logged if e["worker"] == name]
        assert sorted(e["i"] for e in mine) == list(range(count))
        assert all(e["pad"] == "x" * 6000 and e["task"] == f"{name}/t{e['i']:05d}" for e in mine)
    assert store.event_log.computed_counts() == {f"{n}/t{i:05d}": 1 for n in ("w0", "w1") for i in range(count)}


@pytest.mark.slow
def test_weights_rewritten_in_place_invalidate_tasks_and_touching_does_not(shots_file, tiny_model_dir, reference_dir,
                                                                           tmp_path):
    from safetensors.torch import load_file, save_file

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(reference_dir, out)
    env = {"MMPL_CACHE_DIR": str(tmp_path / "cache")}

    def render() -> list[dict]:
        before = {e["time"] for e in events(out)}
        proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(model), env=env)
        assert proc.returncode == 0, proc.stderr
        return [e for e in events(out) if e["event"] == "finished" and e["time"] not in before]

    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    old = weights.stat()
    os.utime(weights, (old.st_atime - 100, old.st_mtime - 100))  # a copy, and touched: the same contents
    assert render() == []  # every task is reused
    cache = json.loads((tmp_path / "cache/digests.json").read_text())
    assert any(key.endswith(f":{weights.resolve()}") for key in cache)  # digested, and remembered
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name] * 1.01  # retrained in place: the same names, shapes and size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == old.st_size
    recomputed = {e["task"] for e in render()}
    manifest = json.loads((out / ".mmpl/manifest.json").read_text())
    assert recomputed == {t["id"] for s in manifest["shots"] for t in s["tasks"]}
    assert videos(out) != videos(reference_dir)


def test_ready_tasks_offers_ready_tasks_best_first_and_keeps_the_skipped_ones():
    from mmpl_cli.plan import Task
    from mmpl_cli.worklist import ReadyTasks

    def task(tid, *deps):
        return Task(tid, "s", "plan", 0, deps)

    tasks = {t.id: t for t in (task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c"), task("e"))}
    ready = ReadyTasks(tasks, {"a": (0,), "b": (2,), "c": (1,), "d": (0, 1), "e": (3,)})
    looking = ready.in_order()
    assert [next(looking), next(looking)] == ["a", "e"]
    looking.close()  # both skipped (another worker holds them): they stay ready
    assert list(ready.in_order()) == ["a", "e"]
    seen = []
    for tid in ready.in_order():
        seen.append(tid)
        if tid == "a":
            ready.finished("a")  # b and c become ready while we look: offered in the same pass, best first
    assert seen == ["a", "c", "b", "e"]
    ready.finished("c")
    assert list(ready.in_order()) == ["b", "e"]  # d waits for b
    ready.finished("b")
    looking = ready.in_order()
    assert next(looking) == "d"
    ready.reopen("c")  # d read c and found it damaged: c runs again, and d waits for it again
    assert list(looking) == ["c", "e"] and list(ready.in_order()) == ["c", "e"]
    ready.finished("c")
    assert list(ready.in_order()) == ["d", "e"]
    ready.finished("d"), ready.finished("e")
    assert list(ready.in_order()) == [] and ready.done == set(tasks)


def test_results_keep_what_pending_tasks_read_and_only_the_latest(tmp_path):
    import torch

    from mmpl_cli.plan import Task
    from mmpl_cli.results import Latents
    from mmpl_cli.worklist import HeldResults, ReadyTasks
    from mmpl_cli.store import RenderStore

    store = RenderStore(tmp_path)
    made = [f"k/s000/t{i}" for i in range(4)]
    tasks = {tid: Task(tid, "k", "plan", 0, ()) for tid in made}
    tasks["k/s000/decode"] = Task("k/s000/decode", "k", "decode", 0, tuple(made))  # reads all four
    graph = ReadyTasks(tasks, dict.fromkeys(tasks, (0,)))
    results = HeldResults(store, dict.fromkeys(tasks, "h"), graph, limit=2)
    for i, tid in enumerate(made):
        results.keep(tid, store.save(tid, "h", Latents(torch.full((1, 1, 1, 1), float(i)))))
    assert list(results) == made[2:]  # the two used last
    assert float(results[made[0]].latents) == 0.0  # dropped, so read again from the folder: the same values
    assert list(results) == [made[3], made[0]]
    graph.finished("k/s000/decode")  # the last reader is done: nothing is kept any more
    results.finished(tasks["k/s000/decode"])
    assert len(results) == 0 and float(results[made[1]].latents) == 1.0 and len(results) == 0


def test_a_file_another_worker_writes_during_the_run_is_checked_by_its_header_and_verified_when_read(tmp_path):
    """A worker does not read and hash every file its peers write: a task file that appears after the
    worker's first look (its start, or an earlier is_done) is checked from its header, its contents
    when the worker reads it; one that was there at the first look (a resume) is verified whole."""
    import torch
    from safetensors.torch import save_file

    from mmpl_cli.results import Latents
    from mmpl_cli.store import RenderStore

    warned: list[str] = []
    here, peer = RenderStore(tmp_path, warn=warned.append), RenderStore(tmp_path, worker="peer")
    tid, stale, cut = "k/s000/plan", "k/s001/plan", "k/s002/plan"
    here.note_absent([tid, stale, cut])  # the worker's start: nothing there yet
    for t in (tid, stale, cut):
        peer.save(t, "h" if t != stale else "other inputs", Latents(torch.arange(24.0).reshape(1, 2, 3, 4)))
    path = tmp_path / ".mmpl" / "tasks" / "k" / "s000-plan.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last value is now inf: header intact, checksum wrong
    path.write_bytes(bytes(data))
    short = tmp_path / ".mmpl" / "tasks" / "k" / "s002-plan.safetensors"
    short.write_bytes(short.read_bytes()[:-4])  # the header says more than the file holds
    assert here.is_done(tid, "h")  # its header is the task's: done, contents not hashed
    assert not here.is_done(stale, "h") and not here.is_done(cut, "h")  # another hash; a cut file
    odd = "k/s003/plan"  # a tensor mmpl never writes (float16): refused by the header too
    assert not here.is_done(odd, "h")
    save_file({"latents": torch.zeros(1, 1, 1, 1), "window": torch.zeros(1, dtype=torch.float16)},
              str(path.with_name("s003-plan.safetensors")), metadata={"hash": "h"})
    assert not here.is_done(odd, "h")
    assert here.load(tid, "h") is None and "checksum mismatch" in warned[-1]  # read: verified whole
    assert not here.is_done(tid, "h")  # and from then on known to be damaged
    started = RenderStore(tmp_path)
    started.note_absent([tid])  # a worker that finds the file there at its start verifies it whole
    assert not started.is_done(tid, "h") and not RenderStore(tmp_path).is_done(tid, "h")
    assert RenderStore(tmp_path).is_done(stale, "other inputs")
    video = tmp_path / "segments" / "k" / "s000.mp4"  # a video task: its record is read, the video hashed on use
    video.parent.mkdir(parents=True)
    video.write_bytes(b"frames")
    assert not here.is_done("k/s000/decode", "h")
    peer.save_video("k/s000/decode", "h", video)
    video.write_bytes(b"changed")
    assert here.is_done("k/s000/decode", "h") and not RenderStore(tmp_path).is_done("k/s000/decode", "h")


def test_the_digest_cache_reads_a_weight_file_once_per_version(tmp_path):
    from mmpl_cli.files import DigestCache

    weights, old = tmp_path / "w.bin", time.time() - 100
    weights.write_bytes(b"a" * 1000)
    os.utime(weights, (old, old))
    reads: list[int] = []
    first = DigestCache(tmp_path / "d.json")
    digest = first.digest(weights, reads.append)
    first.save()
    cache = DigestCache(tmp_path / "d.json")  # another process
    assert cache.digest(weights, reads.append) == digest and reads == [1000]  # unchanged: a stat, no read
    os.utime(weights, (old + 1, old + 1))  # touched: read again, the same digest
    assert cache.digest(weights, reads.append) == digest and len(reads) == 2
    with open(weights, "r+b") as fh:  # retrained in place: same size, its mtime set back afterwards
        fh.write(b"b")
    os.utime(weights, (old + 1, old + 1))
    assert cache.digest(weights, reads.append) != digest and len(reads) == 3
    fresh = tmp_path / "new.bin"  # written just now: not remembered (a rewrite within a timestamp tick)
    fresh.write_bytes(b"x")
    cache.digest(fresh, reads.append), cache.digest(fresh, reads.append)
    assert len(reads) == 5
