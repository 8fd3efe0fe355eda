"""End to end through the real CLI in subprocesses: real model classes, real ffmpeg, real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_cli
from mmpl_cli.plan import plan_shot
from mmpl_cli.profiles import load_profile
from mmpl_cli.render import ShotRunner, load_init_image
from mmpl_cli.store import RenderStore
from mmpl_cli.shotlist import load_shot_list
from mmpl_cli.video import count_frames, read_frames


@pytest.fixture(scope="module")
def example_render(tmp_path_factory):
    """The README's render of examples/shots.yaml on the embedded default model."""
    out = tmp_path_factory.mktemp("example")
    proc = run_cli("render", "examples/shots.yaml", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_example_renders_with_the_frames_and_fps_that_plan_states(example_render):
    out, proc = example_render
    plan = json.loads(run_cli("plan", "examples/shots.yaml", "--json").stdout)
    assert len(plan["shots"]) >= 2
    for shot in plan["shots"]:
        path = out / f"{shot['id']}.mp4"
        assert f"wrote {path}" in proc.stdout
        frames, fps = count_frames(path)
        assert (frames, fps) == (shot["frames"], shot["fps"])
        assert shot["duration_s"] == shot["frames"] / shot["fps"]
        # the stitched video is the per-segment videos back to back, frame for frame
        parts = [out / "segments" / shot["id"] / f"s{i:03d}.mp4" for i in range(shot["segments"])]
        assert [count_frames(p)[0] for p in parts] == [s["keep"][1] - s["keep"][0] for s in shot["segment_plan"]]
        assert np.array_equal(read_frames(path), np.concatenate([read_frames(p) for p in parts]))


@pytest.mark.slow
def test_two_renders_are_bit_identical(example_render, tmp_path):
    first, _ = example_render
    proc = run_cli("render", "examples/shots.yaml", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    videos = sorted(p.relative_to(first) for p in first.rglob("*.mp4"))
    assert videos and videos == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.mp4"))
    for rel in videos:
        assert (first / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def _shots(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "shots.yaml"
    path.write_text("version: 1\ndefaults: {steps: 2, seed: 4}\nshots:\n" + body)
    return path


@pytest.mark.slow
def test_midpoint_seeding_renders_the_planned_frames(tmp_path, tiny_model_dir):
    shots = _shots(tmp_path, "  - {id: mid, prompt: 'a boat', duration: 5}\n")
    proc = run_cli("render", str(shots), "--out", str(tmp_path / "out"), "--seeding", "midpoint",
                   "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(run_cli("plan", str(shots), "--seeding", "midpoint", "--json").stdout)["shots"][0]
    assert plan["segments"] == 2  # 80 frames = 49 + 31: the frames after each midpoint are never made
    assert count_frames(tmp_path / "out" / "mid.mp4") == (80, 16.0)
    assert "populate_stage_two" not in proc.stdout


@pytest.mark.slow
def test_a_render_into_a_folder_with_quotes_spaces_and_a_backslash_in_its_name(tmp_path, tiny_model_dir):
    """The stitch names each segment in ffmpeg's list of parts, quoted: a quote in a folder's name
    once ended the render at its last task (ffmpeg read the rest of the name as another word)."""
    shots = _shots(tmp_path, "  - {id: odd, prompt: 'a boat', duration: 9}\n")
    out = tmp_path / "Bob's \"renders\" \\ été"
    proc = run_cli("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(run_cli("plan", str(shots), "--json").stdout)["shots"][0]
    assert plan["segments"] == 2
    parts = [out / "segments" / "odd" / f"s{i:03d}.mp4" for i in range(2)]
    assert count_frames(out / "odd.mp4") == (plan["frames"], plan["fps"])
    assert np.array_equal(read_frames(out / "odd.mp4"), np.concatenate([read_frames(p) for p in parts]))


@pytest.mark.slow
def test_progressive_goes_on_from_the_window_the_previous_segment_handed_on(tmp_path, tiny_model_dir):
    shots = _shots(tmp_path, "  - {id: pg, prompt: 'a boat', duration: 9, strategy: progressive, steps: 3}\n")
    out = tmp_path / "out"
    render = ("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir))
    proc = run_cli(*render)
    assert proc.returncode == 0, proc.stderr
    assert count_frames(out / "pg.mp4") == (144, 16.0)
    video = (out / "pg.mp4").read_bytes()
    # segment 1 again, from segment 0's stored latents and the noisy window it handed on
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / ".mmpl/tasks/pg/s000-progressive.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("window").shape[1] == 6  # the clean chunk and 2 noisy ones, 2 latents each
        assert "checksum.window" in fh.metadata()
    second = out / ".mmpl/tasks/pg/s001-progressive.safetensors"
    made = load_file(second)
    second.unlink()
    proc = run_cli(*render)
    assert proc.returncode == 0, proc.stderr
    assert "pg/s001/progressive done" in proc.stdout and "pg/s000/progressive done" not in proc.stdout
    again = load_file(second)
    assert made.keys() == again.keys() == {"latents", "window"}
    assert all(torch.equal(made[k], again[k]) for k in made)  # bit for bit
    assert (out / "pg.mp4").read_bytes() == video


@pytest.mark.slow
def test_image_to_video_starts_from_the_image(tmp_path, tiny_model_dir, backend):
    gradient = np.zeros((90, 120, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 120, dtype=np.uint8)[None]
    gradient[..., 2] = 200
    Image.fromarray(gradient).save(tmp_path / "start.png")
    Image.fromarray(255 - gradient).save(tmp_path / "other.png")
    shots = _shots(tmp_path, "  - {id: i2v, prompt: 'a sunset', duration: 2, init_image: start.png}\n"
                             "  - {id: other, prompt: 'a sunset', duration: 2, init_image: other.png}\n")
    # latent 0 is the VAE encoding of the image alone (latent 1 is generated: test_fidelity.py)
    shot_list = load_shot_list(shots)
    plan = plan_shot(shot_list.shots[0], load_profile("tiny"), "terminal")
    initial = ShotRunner(backend, plan, RenderStore(tmp_path)).run(plan.tasks[0], {}).latents
    image = load_init_image(tmp_path / "start.png", 96, 64)
    assert image.shape == (3, 64, 96)
    assert torch.equal(initial[:, 0], backend.encode(image[:, None])[:, 0])
    # and it reaches the video: a different image gives a different first frame
    out = tmp_path / "out"
    proc = run_cli("render", str(shots), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert count_frames(out / "i2v.mp4") == (32, 16.0)
    assert not np.array_equal(read_frames(out / "i2v.mp4")[0], read_frames(out / "other.mp4")[0])


@pytest.mark.parametrize("body, extra, words", [
    ("  - {id: a, prompt: x, duraton: 1}\n", [], ["shots.yaml:4", "duraton", "did you mean 'duration'"]),
    ("  - {id: a, prompt: x, duration: 1}\n", ["--profile", "tinny"], ["unknown profile 'tinny'", "did you mean 'tiny'"]),
    ("  - {id: a, prompt: x, duration: 1}\n", ["--model-path", "/nonexistent/wan"],
     ["model folder not found: /nonexistent/wan", "--model-path"]),
])
def test_bad_input_exits_2_without_traceback_or_output(tmp_path, body, extra, words):
    shots = _shots(tmp_path, body)
    out = tmp_path / "out"
    proc = run_cli("render", str(shots), "--out", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in proc.stderr
    assert not out.exists()


def test_missing_weight_files_are_listed(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    for sub in ("transformer", "vae", "tokenizer"):
        (broken / sub).mkdir(parents=True)
        for f in (tiny_model_dir / sub).iterdir():
            (broken / sub / f.name).write_bytes(f.read_bytes())
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shots = _shots(tmp_path, "  - {id: a, prompt: x, duration: 1}\n")
    proc = run_cli("render", str(shots), "--out", str(tmp_path / "out"), "--model-path", str(broken))
    assert proc.returncode == 2
    assert "vae/*.safetensors" in proc.stderr and "text_encoder/config.json" in proc.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.strip().startswith("mmpl ")
    help_text = run_cli("render", "--help").stdout
    assert "--seeding" in help_text and "--out" in help_text
    assert (REPO / "examples" / "shots.yaml").exists()


@pytest.mark.slow
def test_storyboard_is_written_when_planning_is_done_with_one_tile_per_planning_frame(tmp_path):
    from mmpl_cli.storyboard import LABEL

    shots = _shots(tmp_path, '  - {id: sb, prompt: "a large green square moving up on a red background", duration: 9}\n')
    proc = run_cli("render", str(shots), "--out", str(tmp_path / "out"), "--storyboard")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    wrote = next(i for i, line in enumerate(lines) if "storyboard: wrote" in line)
    populate = [i for i, line in enumerate(lines) if "/populate_stage_" in line and " done " in line]
    assert populate and wrote < min(populate)  # there before any content was populated

    profile = load_profile("tiny")
    plan = plan_shot(load_shot_list(shots).shots[0], profile, "terminal")
    rows, columns = len(plan.segments), len(profile.layout.plan.targets)  # 2 segments x 7 planning latents
    sheet = np.asarray(Image.open(tmp_path / "out" / "sb.storyboard.png").convert("RGB"))
    tile_w, tile_h, gap = 2 * profile.width, 2 * profile.height, 4  # tiny frames are drawn at twice their size
    assert sheet.shape[:2] == (gap + rows * (tile_h + LABEL + gap), gap + columns * (tile_w + gap))
    # every tile is a picture, not the white page: count the non-white tiles
    tiles = [sheet[gap + r * (tile_h + LABEL + gap) + LABEL:][:tile_h, gap + c * (tile_w + gap):][:, :tile_w]
             for r in range(rows) for c in range(columns)]
    assert sum((t < 250).any(axis=2).mean() > 0.9 for t in tiles) == rows * columns

    # the same render measured where its segments join and where planning meets content
    proc = run_cli("eval", str(tmp_path / "out" / "sb.mp4"), "--segments-from", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["videos"][0]
    edges = [f for s in plan.summary()["segment_plan"] for f in s["plan_content_boundaries"]]
    assert result["joins"]["count"] == 1 and result["plan_content"]["count"] == len(edges) > 4
    assert 0 <= result["joins"]["h_l1_mean"] <= 2 and -1 <= result["plan_content"]["h_corr_min"] <= 1
