"""Paths a user names for output (`--out`, `--plot`, `--gantt`, `--script`) and folders mmpl reads
back (`--segments-from`, `status`): a path at a folder, under a file, or a folder of the wrong shape
is refused with exit 2 before any work, naming the option, with no traceback and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli
import test_limits as limits

EXAMPLE = REPO / "examples" / "shots.yaml"


@pytest.fixture
def place(tmp_path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


def refused(place: Path, *args: str, expect: str) -> None:
    """`expect` is "OPTION: words": both must be in the one message (test_limits.refused checks the rest)."""
    limits.refused(place, *args, expect=expect.split(": ", 1))


@pytest.mark.parametrize("target, expect", [
    ("a-file/out.png", "a-file is a file, not a folder"),
    ("a-file/deeper/out.png", "a-file is a file, not a folder"),
    ("a-folder", "expected a file name, found a folder"),
])
def test_files_mmpl_writes(place, target, expect):
    path = str(place / target)
    refused(place, "plan", str(EXAMPLE), "--gantt", path, expect=f"--gantt: {expect}")
    refused(place, "slurm", str(EXAMPLE), "--array", "2", "--out", str(place / "r"), "--script", path,
            expect=f"--script: {expect}")


def test_folders_mmpl_writes(place):
    for target in ("a-file/out", "a-file"):
        expect = "a-file is a file, not a folder" if "/" in target else "expected a folder, found a file"
        refused(place, "render", str(EXAMPLE), "--out", str(place / target), expect=f"--out: {expect}")
        refused(place, "slurm", str(EXAMPLE), "--array", "2", "--out", str(place / target), expect="--out:")
    # ffmpeg's list of a shot's segments is one file a line: a folder whose path has a line break
    # is refused before any work, not after every task of the render at its stitch
    refused(place, "render", str(EXAMPLE), "--out", str(place / "two\nlines"),
            expect="--out: expected a folder whose path has no line break")
    refused(place, "render", str(EXAMPLE), "--out", str(place / b"latin-1 caf\xe9".decode(errors="surrogateescape")),
            expect="--out: expected a folder whose path is UTF-8 text")


@pytest.mark.slow
def test_eval_refuses_a_bad_plot_path_before_reading_any_video(place, reference_dir):
    video = str(reference_dir / "k.mp4")
    refused(place, "eval", video, "--plot", str(place / "a-file/p.png"), expect="--plot: a-file is a file, not a folder")
    refused(place, "eval", video, "--plot", str(place / "a-folder"), expect="--plot: expected a file name, found a folder")
    refused(place, "eval", str(place / "a-folder"), expect="VIDEO: no such file")
    refused(place, "eval", str(place / "a-file"), expect="VIDEO: expected a video ffmpeg can read")
    proc = run_cli("eval", video, "--plot", str(place / "new/sub/p.png"))  # missing folders on the way are made
    assert proc.returncode == 0, proc.stderr
    assert (place / "new/sub/p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("manifest", [
    "[" * 100000,  # nested past any parser's recursion
    '{"shots": [1, 2]}',
    '{"shots": [{"id": "k", "segment_plan": 7}]}',
    '{"shots": [{"id": "k", "segment_plan": [{"video_frames": []}, {"video_frames": "x"}]}]}',
], ids=["deep", "shots_not_mappings", "plan_not_a_list", "frames_of_the_wrong_type"])
def test_eval_segments_from_a_folder_of_the_wrong_shape(manifest, reference_dir, tmp_path):
    folder = tmp_path / "render"
    shutil.copytree(reference_dir, folder)
    (folder / ".mmpl/manifest.json").write_text(manifest)
    refused(tmp_path, "eval", str(folder / "k.mp4"), "--segments-from", str(folder), expect="manifest.json")


@pytest.mark.slow
def test_status_reads_events_of_every_shape(reference_dir, tmp_path):
    folder = tmp_path / "render"
    shutil.copytree(reference_dir, folder)
    garbage = '[1]\n"x"\n{"task": 5}\n' + "[" * 100000 + "\n" + '{"event": "finished"\n'
    for log in (folder / ".mmpl/events").glob("*.jsonl"):
        log.write_text(log.read_text() + garbage)
    (folder / ".mmpl/events.jsonl").write_text(garbage)  # the single log of older folders
    (folder / ".mmpl/events/dir.jsonl").mkdir()  # not a file
    outside = tmp_path / "outside.jsonl"  # a planted link: its events are not the folder's
    outside.write_text('{"event": "finished", "task": "k/s000/plan", "time": 1}\n')
    (folder / ".mmpl/events/link.jsonl").symlink_to(outside)
    proc = run_cli("status", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["remaining"] == 0 and all(shot["complete"] for shot in report["shots"])
    assert {t["computed"] for t in report["tasks"]} == {1}  # the finished events still count, the rest skipped


@pytest.mark.slow
def test_status_of_the_current_folder(reference_dir, tmp_path):
    folder = tmp_path / "render"
    shutil.copytree(reference_dir, folder)
    proc = run_cli("status", ".", "--json", cwd=folder)  # paths under "." are the folder's too
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["remaining"] == 0
