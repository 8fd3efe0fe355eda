"""`mmpl eval` on videos with a known colour shift and known flicker, written as real MP4s."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import run_cli, run_measured
from mmpl_cli.evaluate import Boundaries, compare, evaluate_frames
from mmpl_cli.video import write_mp4

RED, GREEN, BLUE = (220, 40, 40), (40, 180, 60), (45, 70, 225)


def half_shift(frames: int = 48, at: int = 24) -> np.ndarray:
    """Left half red throughout; right half red until frame `at`, then green."""
    video = np.empty((frames, 64, 96, 3), np.uint8)
    video[:, :, :48] = RED
    video[:at, :, 48:] = RED
    video[at:, :, 48:] = GREEN
    return video


def flicker(frames: int = 32, low: int = 100, high: int = 140) -> np.ndarray:
    levels = np.where(np.arange(frames) % 2 == 0, low, high).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, 64, 96, 3)).copy()


def test_hue_comparison_of_known_frames():
    red, green = np.full((8, 8, 3), RED, np.uint8), np.full((8, 8, 3), GREEN, np.uint8)
    assert compare(red, red) == pytest.approx((0.0, 1.0))
    l1, corr = compare(red, green)
    assert l1 == pytest.approx(2.0) and corr < 0  # no hue in common
    assert compare(red, half_shift()[-1])[0] == pytest.approx(1.0)  # half of the hue mass moved


@pytest.mark.slow
def test_eval_measures_a_known_colour_shift_and_known_flicker(tmp_path):
    shift = write_mp4(half_shift(), tmp_path / "shift.mp4", 16)
    steady = write_mp4(np.repeat(half_shift()[:1], 48, axis=0), tmp_path / "steady.mp4", 16)
    flick = write_mp4(flicker(), tmp_path / "flicker.mp4", 16)
    proc = run_cli("eval", str(shift), str(steady), str(flick), "--json", "--plot", str(tmp_path / "drift.png"))
    assert proc.returncode == 0, proc.stderr
    shift_r, steady_r, flick_r = json.loads(proc.stdout)["videos"]

    assert shift_r["first_last"]["h_l1"] == pytest.approx(1.0, abs=0.05)
    assert shift_r["first_last"]["h_corr"] < 0.9
    assert steady_r["first_last"]["h_l1"] < 0.02 and steady_r["first_last"]["h_corr"] > 0.99
    # per second: 0 at 0 s and 1 s (frames 0 and 16), the shift from 2 s (frame 32) on
    assert len(shift_r["drift_h_l1"]) == 3
    assert shift_r["drift_h_l1"][:2] == pytest.approx([0.0, 0.0], abs=0.02)
    assert shift_r["drift_h_l1"][2] == pytest.approx(1.0, abs=0.05)
    # flicker: grey 100 <-> 140 every frame is a change of 40/255 per frame; a steady video has none
    assert flick_r["flicker"]["mean"] == pytest.approx(40 / 255, abs=0.01)
    assert steady_r["flicker"]["max"] < 0.01
    assert shift_r["flicker"]["max"] > 0.1 > shift_r["flicker"]["mean"]  # one jump, otherwise still
    assert (tmp_path / "drift.png").stat().st_size > 0

    table = run_cli("eval", str(shift), str(steady)).stdout
    assert "shift.mp4" in table and "1.0" in table.splitlines()[1]


def test_boundary_metrics_look_only_at_the_given_frames():
    video = half_shift(48, at=20)
    result = evaluate_frames(video, 16, Boundaries(joins=[20], plan_content=[10, 30]))
    assert result["joins"]["count"] == 1 and result["joins"]["h_l1_mean"] == pytest.approx(1.0)
    assert result["plan_content"]["count"] == 2 and result["plan_content"]["h_l1_max"] == pytest.approx(0.0)


def test_drift_below_one_frame_a_second():
    """At 0.5 fps two whole seconds share a frame: every second still gets its drift figure."""
    result = evaluate_frames(half_shift(10, at=5), 0.5)
    assert len(result["drift_h_l1"]) == 19  # seconds 0 .. 18 of 10 frames at 0.5 fps
    assert result["drift_h_l1"][0] == 0.0 and result["drift_h_l1"][-1] == pytest.approx(1.0)


def test_eval_reports_bad_input_with_exit_2(tmp_path):
    (tmp_path / "not-a-video.mp4").write_text("hello")
    proc = run_cli("eval", str(tmp_path / "missing.mp4"))
    assert proc.returncode == 2 and "missing.mp4: VIDEO: no such file" in proc.stderr
    proc = run_cli("eval", str(tmp_path / "not-a-video.mp4"))
    assert proc.returncode == 2 and "expected a video ffmpeg can read" in proc.stderr
    assert "Traceback" not in proc.stderr



@pytest.mark.slow
def test_a_minute_of_832x480_is_measured_under_a_1_gb_memory_cap(tmp_path):
    """eval streams frames: 960 frames of 832x480 (1.1 GB decoded) under a 1 GB address-space cap."""
    from mmpl_cli.video import ffmpeg_binary

    video = tmp_path / "minute.mp4"
    subprocess.run([ffmpeg_binary(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=832x480:rate=16",
                    "-t", "60", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(video)], check=True)
    proc, peak_mb = run_measured("eval", str(video), "--json", address_space=1 << 30)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["videos"][0]
    assert result["frames"] == 960 and len(result["drift_h_l1"]) == 60
    assert peak_mb < 1024


def _hue_frames(hues_pil: list[int]) -> np.ndarray:
    """Frames whose background has these PIL hues (0-255 for 0-360 degrees), a small white square on it."""
    from PIL import Image

    frames = []
    for h in hues_pil:
        hsv = np.zeros((48, 64, 3), np.uint8)
        hsv[..., 0], hsv[..., 1], hsv[..., 2] = h, 200, 200
        rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")).copy()
        rgb[10:18, 10:18] = 255
        frames.append(rgb)
    return np.stack(frames)


@pytest.mark.parametrize("jump, expected", [(20, 10.0), (2, 1.0)])
def test_join_step_ratio_of_a_known_jump(jump, expected, tmp_path):
    """The background turns 2 PIL hue units (2.8 degrees) a frame; at the joins (frames 20 and 40) by
    `jump` units: the join step ratio is jump / 2 by hue, in the JSON of `mmpl eval --segments-from`."""
    hues, h = [], 100
    for i in range(60):
        h += (jump if i in (20, 40) else 2) if i else 0
        hues.append(h % 256)
    result = evaluate_frames(_hue_frames(hues), 16, Boundaries(joins=[20, 40]))
    joins = result["joins"]
    # RGB rounds each frame's hue by up to one PIL unit (1.4 degrees)
    assert joins["step_deg_mean"] == pytest.approx(jump * 360 / 256, abs=1.5)
    assert joins["step_deg_inside_median"] == pytest.approx(2 * 360 / 256, abs=1.5)
    assert joins["step_ratio_deg"] == pytest.approx(expected, rel=0.3)


def test_eval_json_carries_join_step_ratios(tmp_path):
    """The same videos as MP4s with a render folder that says where the joins are, through the CLI."""
    folder = tmp_path / "render"
    (folder / ".mmpl").mkdir(parents=True)
    segments = [{"video_frames": [a, a + 20]} for a in (0, 20, 40)]
    shots = []
    for name, jump in (("jumps", 20), ("smooth", 2)):
        hues, h = [], 100
        for i in range(60):
            h += (jump if i in (20, 40) else 2) if i else 0
            hues.append(h % 256)
        write_mp4(_hue_frames(hues), folder / f"{name}.mp4", 16)
        shots.append({"id": name, "segment_plan": segments})
    (folder / ".mmpl/manifest.json").write_text(json.dumps({"store_version": 1, "shots": shots}))
    proc = run_cli("eval", str(folder / "jumps.mp4"), str(folder / "smooth.mp4"), "--segments-from", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    jumps, smooth = (v["joins"] for v in json.loads(proc.stdout)["videos"])
    assert jumps["step_ratio_deg"] == pytest.approx(10.0, rel=0.3)  # RGB and H.264 move the hues a little
    assert smooth["step_ratio_deg"] == pytest.approx(1.0, rel=0.3)
    table = run_cli("eval", str(folder / "jumps.mp4"), "--segments-from", str(folder)).stdout
    assert "join step ratio" in table.splitlines()[0]
