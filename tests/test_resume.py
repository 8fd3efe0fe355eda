"""Nothing is lost: kills, signals, edits and damaged files, with real subprocesses and real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, events, run_cli, videos
from mmpl_cli.video import VideoError, stitch, write_mp4


def start_render(shots: Path, out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmpl_cli", "render", str(shots), "--out", str(out),
                             "--model-path", str(model)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_start(out: Path, task_id: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Block until the render logs that it started `task_id` (polling its event log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = events(out)
        if any(e["event"] == "started" and e["task"] == task_id for e in logged[-3:]):
            return
        if any(e["event"] == "finished" and e["task"] == task_id for e in logged):
            raise AssertionError(f"{task_id} had already finished")
        if proc.poll() is not None:
            raise AssertionError(f"render ended before {task_id} started: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"{task_id} never started")


def status(out: Path) -> dict:
    proc = run_cli("status", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_identical(shots_file, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "out"
    # planning, populating, decoding, stitching (in the order the worker takes them): kill the
    # moment each has started
    for task_id in ("k/s000/plan", "k/s001/populate_stage_one", "k/s000/decode", "k/stitch"):
        proc = start_render(shots_file, out, tiny_model_dir)
        wait_for_start(out, task_id, proc)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert all(t["state"] in ("done", "missing") for t in status(out)["tasks"])
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert videos(out) == reference
    report = status(out)
    assert report["remaining"] == 0
    # every task was finished exactly once over all the runs: nothing finished was computed again
    assert {t["id"]: t["computed"] for t in report["tasks"]} == {t["id"]: 1 for t in report["tasks"]}
    assert not list(out.rglob("*.tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signals_stop_cleanly_with_exit_3_and_resume(sig, shots_file, tiny_model_dir, reference, reference_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out)  # the last populating task and what follows it are left to do
    redo = ("k/s001/populate_stage_two", "k/s001/decode", "k/stitch")
    for name in ("s001-populate_stage_two.safetensors", "s001-decode.json", "stitch.json"):
        (out / ".mmpl/tasks/k" / name).unlink()
    for log in (out / ".mmpl/events").glob("*.jsonl"):  # as if they had never run
        log.write_text("".join(line for line in log.read_text().splitlines(keepends=True)
                               if json.loads(line)["task"] not in redo))
    proc = start_render(shots_file, out, tiny_model_dir)
    wait_for_start(out, "k/s001/populate_stage_two", proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert f"stopped by {sig.name}" in stderr
    assert f"resume with: mmpl render {shots_file} --out {out}" in stderr
    report = status(out)
    states = {t["id"]: t["state"] for t in report["tasks"]}
    assert set(states.values()) <= {"done", "missing"}  # consistent: nothing half-written
    assert {i for i, state in states.items() if state == "missing"} == set(redo)
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert videos(out) == reference
    # the interrupted run finished nothing, so every task was computed exactly once
    assert {t["id"]: t["computed"] for t in status(out)["tasks"]} == {t: 1 for t in states}


def _computed(out: Path) -> dict[str, int]:
    return {t["id"]: t["computed"] for t in status(out)["tasks"]}


@pytest.mark.slow
def test_editing_one_shot_leaves_the_other_untouched(tmp_path, tiny_model_dir):
    body = """version: 1
defaults: {steps: 2}
shots:
  - {id: a, prompt: "a red kite", duration: 2}
  - {id: b, prompt: "%s", duration: 2}
"""
    shots = tmp_path / "shots.yaml"
    out = tmp_path / "out"
    shots.write_text(body % "a green field")
    assert run_cli("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir)).returncode == 0
    a_video = (out / "a.mp4").read_bytes()
    b_video = (out / "b.mp4").read_bytes()
    shots.write_text(body % "a yellow field")
    assert run_cli("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir)).returncode == 0
    counts = _computed(out)
    assert {k: v for k, v in counts.items() if k.startswith("a/")} == {k: 1 for k in counts if k.startswith("a/")}
    assert all(v == 2 for k, v in counts.items() if k.startswith("b/"))
    assert (out / "a.mp4").read_bytes() == a_video
    assert (out / "b.mp4").read_bytes() != b_video


@pytest.mark.slow
def test_changing_the_prompt_from_second_20_keeps_every_earlier_segment(tmp_path, tiny_model_dir):
    body = """version: 1
defaults: {steps: 2}
shots:
  - id: long
    duration: 25
    prompts:
      - {at: 0, prompt: "a desert road"}
      - {at: 20, prompt: "%s"}
"""
    # A profile at 4 fps keeps this quick: 25 s = 100 frames = 2 segments, the second starting at 20.25 s.
    profile = (REPO / "profiles" / "tiny.yaml").read_text().replace("fps: 16", "fps: 4")
    (tmp_path / "slow.yaml").write_text(profile.replace("path: builtin:tiny", f"path: {tiny_model_dir}"))
    body = body.replace("defaults: {steps: 2}", "defaults: {steps: 2, profile: slow.yaml}")
    shots = tmp_path / "shots.yaml"
    out = tmp_path / "out"
    shots.write_text(body % "a city at night")
    plan = json.loads(run_cli("plan", str(shots), "--json").stdout)["shots"][0]
    starts = [s["video_frames"][0] / plan["fps"] for s in plan["segment_plan"]]
    changed = [i for i, t in enumerate(starts) if t >= 20]
    assert changed and changed[0] > 0  # segments before second 20 exist
    assert run_cli("render", str(shots), "--out", str(out)).returncode == 0
    shots.write_text(body % "a city at dawn")
    assert run_cli("render", str(shots), "--out", str(out)).returncode == 0
    counts = _computed(out)
    for task_id, n in counts.items():
        parts = task_id.split("/")
        if parts[1] == "stitch":
            assert n == 2
            continue
        segment, kind = int(parts[1][1:]), parts[2]
        # a segment's hand-over only reads the previous segment, which kept its prompt
        recomputed = segment in changed and kind != "initial"
        assert n == (2 if recomputed else 1), task_id


@pytest.mark.slow
def test_damaged_task_files_are_detected_and_recomputed(shots_file, tiny_model_dir, reference, reference_dir,
                                                        tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out)  # a finished render, each task computed once
    tasks = out / ".mmpl" / "tasks" / "k"
    truncated = tasks / "s001-plan.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:200])
    altered = tasks / "s000-populate_stage_one.safetensors"
    data = bytearray(altered.read_bytes())
    data[-10] ^= 0xFF  # one bit pattern in the tensor data, header intact
    altered.write_bytes(bytes(data))
    segment_video = out / "segments" / "k" / "s000.mp4"
    segment_video.write_bytes(segment_video.read_bytes()[:-100])
    states = {t["id"]: t["state"] for t in status(out)["tasks"]}
    assert states["k/s001/plan"] == states["k/s000/populate_stage_one"] == states["k/s000/decode"] == "invalid"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "k/s001/plan: unreadable task file" in proc.stdout
    assert "k/s000/populate_stage_one: task file altered" in proc.stdout
    assert videos(out) == reference
    counts = _computed(out)
    assert counts["k/s001/plan"] == counts["k/s000/populate_stage_one"] == counts["k/s000/decode"] == 2
    assert counts["k/s000/plan"] == 1


@pytest.mark.slow
def test_restart_computes_everything_again(shots_file, tiny_model_dir, reference, reference_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out)  # a finished render, each task computed once
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir), "--restart")
    assert proc.returncode == 0, proc.stderr
    assert set(_computed(out).values()) == {2}
    assert videos(out) == reference


@pytest.mark.slow
def test_ffmpeg_failure_keeps_finished_tasks(shots_file, tiny_model_dir, reference, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"IMAGEIO_FFMPEG_EXE": "/bin/false"})
    assert proc.returncode == 1
    assert "ffmpeg failed" in proc.stderr and "resume with: mmpl render" in proc.stderr
    assert "Traceback" not in proc.stderr
    states = {t["id"]: t["state"] for t in status(out)["tasks"]}
    assert states["k/s000/populate_stage_two"] == "done" and states["k/s000/decode"] == "missing"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert videos(out) == reference
    assert _computed(out)["k/s000/plan"] == 1


def test_each_ffmpeg_failure_names_its_own_messages(tmp_path):
    """A thread's file for ffmpeg's messages is kept for its next run: emptied first, so a failure
    says what went wrong in that run, not in an earlier one. A part of a stitch that cannot be read
    is a failure (ffmpeg alone would say so and exit 0 with the video cut short)."""
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    with pytest.raises(VideoError) as first:
        write_mp4(frames, tmp_path / "no-such-folder" / "a.mp4", 16)
    write_mp4(frames, tmp_path / "fine.mp4", 16)
    with pytest.raises(VideoError) as second:
        stitch([tmp_path / "fine.mp4", tmp_path / "no-such-part.mp4"], tmp_path / "b.mp4", 16)
    assert "no-such-folder" in str(first.value) and "no-such-part" not in str(first.value)
    assert "no-such-part" in str(second.value) and "no-such-folder" not in str(second.value)
