"""Where mmpl follows the MMPL paper and its released code closely: the hand-over that decodes every
planning latent in order, image-to-video with the image as one latent and the next one generated,
Wan's negative prompt, and App. G's edge noise under k-step noise search."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, run_cli, videos
from mmpl_cli.plan import plan_shot, segment_task_id, task_hashes
from mmpl_cli.profiles import load_profile
from mmpl_cli.render import ShotRunner, load_init_image, to_uint8_frames
from mmpl_cli.sampling import blend_edge_noise
from mmpl_cli.shotlist import PromptChange, Shot
from mmpl_cli.results import Latents, tensor_checksum
from mmpl_cli.store import RenderStore
from mmpl_cli.terms import Kind
from test_resume import wait_for_start

TINY = (REPO / "profiles" / "tiny.yaml").read_text()


def shot(**changes) -> Shot:
    base = dict(id="k", prompts=(PromptChange(0.0, "a small red circle moving right on a blue background"),),
                duration=9, seed=4, negative_prompt=None, init_image=None, strategy="mmpl",
                sampler_overrides={"steps": 3}, line=1)
    return Shot(**{**base, **changes})


def planning_profile():
    profile = load_profile("tiny")
    assert profile.handover == "planning"  # the default
    return profile


def test_the_planning_hand_over_keeps_the_chain_parallel():
    plan = plan_shot(shot(duration=30), planning_profile(), "terminal")
    initials = [t for t in plan.tasks if t.kind == Kind.INITIAL]
    assert len(initials) == 7
    for task in initials[1:]:  # the next segment waits for this one's planning only, never its populating
        k = task.segment
        assert task.deps == (segment_task_id("k", k - 1, Kind.INITIAL), segment_task_id("k", k - 1, Kind.PLAN))
    reencode = task_hashes(plan_shot(shot(duration=30), dataclasses.replace(planning_profile(), handover="reencode"),
                                     "terminal"), "m")
    planning = task_hashes(plan, "m")
    assert reencode["k/s000/plan"] == planning["k/s000/plan"] and reencode["k/s001/initial"] != planning["k/s001/initial"]


def test_the_planning_hand_over_decodes_every_planning_latent_in_order(backend, tmp_path):
    plan = plan_shot(shot(), planning_profile(), "terminal")
    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    results = {}
    for task in plan.tasks:
        if task.segment == 0 and task.kind in (Kind.INITIAL, Kind.PLAN):
            results[task.id] = runner.run(task, results)
    handed = runner.run(next(t for t in plan.tasks if t.kind == Kind.INITIAL and t.segment == 1), results).latents
    first, planned = results["k/s000/initial"].latents[:, :1], results["k/s000/plan"].latents  # plan: 2 3 10 11 12 19 20
    pixels = backend.decode(torch.cat([first, planned], dim=1))  # [L0, L2, L3, L10, L11, L12, L19, L20]
    assert torch.equal(handed, backend.encode(pixels[:, -5:])[:, :2])


@pytest.mark.slow
def test_a_later_segment_is_decoded_after_the_previous_window(backend, tmp_path):
    """`decode: after-previous` (the default): segment 1's frames continue one decode of segment 0's
    window followed by segment 1's latents after its initial group. The VAE is causal, so that decode
    begins with exactly the frames the viewer saw of segment 0, and segment 1's first frame leaves the
    decoder as the frame before it did. `decode: alone` decodes segment 1 from its own re-encoded
    initial latents (MMPL's released code), and the decode waits for segment 0's populating only then."""
    plans = {mode: plan_shot(shot(), dataclasses.replace(planning_profile(), decode=mode), "terminal")
             for mode in ("after-previous", "alone")}
    assert planning_profile().decode == "after-previous"
    plan = plans["after-previous"]
    previous = tuple(segment_task_id("k", 0, kind) for kind in (Kind.INITIAL, Kind.PLAN, Kind.POPULATE_ONE, Kind.POPULATE_TWO))
    decode = {mode: p.task(segment_task_id("k", 1, Kind.DECODE)) for mode, p in plans.items()}
    assert set(previous) <= set(decode["after-previous"].deps) and not set(previous) & set(decode["alone"].deps)
    hashes = {mode: task_hashes(p, "m") for mode, p in plans.items()}
    assert hashes["alone"]["k/s000/decode"] == hashes["after-previous"]["k/s000/decode"]
    assert hashes["alone"]["k/s001/decode"] != hashes["after-previous"]["k/s001/decode"]

    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    results = {}
    for task in plan.tasks:
        if task.kind not in (Kind.DECODE, Kind.STITCH):
            results[task.id] = runner.run(task, results)
    shown = [runner.run(plan.task(segment_task_id("k", k, Kind.DECODE)), results).frames for k in (0, 1)]
    own = [runner.segment_latents(results, k) for k in (0, 1)]
    together = to_uint8_frames(backend.decode(torch.cat([own[0], own[1][:, 2:]], dim=1)))
    window = plan.profile.pixel_frames(own[0].shape[1])  # 81
    assert len(shown[0]) == window and np.array_equal(together[:window], shown[0])
    assert np.array_equal(together[window:window + len(shown[1])], shown[1])
    alone = ShotRunner(backend, plans["alone"], RenderStore(tmp_path)).run(decode["alone"], results).frames
    assert np.array_equal(alone, to_uint8_frames(backend.decode(own[1]))[5:5 + len(shown[1])])
    assert not np.array_equal(alone, shown[1])


def test_wan_profiles_use_wans_negative_prompt_unless_a_shot_names_one():
    wan = load_profile("wan2.1-t2v-1.3b")
    assert wan.negative_prompt.startswith("色调艳丽，过曝，静态") and load_profile("tiny").negative_prompt == ""
    assert plan_shot(shot(), wan, "terminal").shot.negative_prompt == wan.negative_prompt
    assert plan_shot(shot(negative_prompt=""), wan, "terminal").shot.negative_prompt == ""  # "" turns it off
    assert plan_shot(shot(negative_prompt="blurry"), wan, "terminal").summary()["negative_prompt"] == "blurry"
    hashes = [task_hashes(plan_shot(shot(negative_prompt=n), wan, "terminal"), "m")["k/s000/plan"]
              for n in (None, "", wan.negative_prompt)]
    assert hashes[0] == hashes[2] != hashes[1]


def test_noise_search_blends_edge_noise_from_the_plans_chosen_candidate(backend, tmp_path):
    plan = plan_shot(shot(sampler_overrides={"steps": 3, "search": 3, "search_steps": 1}), load_profile("tiny"),
                     "terminal")
    store = RenderStore(tmp_path)
    runner = ShotRunner(backend, plan, store)
    results = {}
    for kind in (Kind.INITIAL, Kind.PLAN):
        task = next(t for t in plan.tasks if t.kind == kind and t.segment == 0)
        results[task.id] = store.save(task.id, "h", runner.run(task, results))  # through the store and back
    chosen = results["k/s000/plan"].candidate
    assert store.load("k/s000/plan", "h").candidate == chosen
    for bad in (float("nan"), 64.0, 1.5):  # a candidate search cannot have chosen, checksums recomputed to match
        store.save("k/s000/odd", "h", Latents(results["k/s000/plan"].latents, candidate=3))
        path = tmp_path / ".mmpl/tasks/k/s000-odd.safetensors"
        tensors = load_file(path)
        tensors["candidate"] = torch.tensor([bad])
        save_file(tensors, path, metadata={"task": "k/s000/odd", "hash": "h", "checksum": tensor_checksum(tensors["latents"]),
                                           "checksum.candidate": tensor_checksum(tensors["candidate"])})
        assert store.load("k/s000/odd", "h") is None  # invalid: computed again, never used
    bf16 = {"latents": results["k/s000/plan"].latents.bfloat16()}  # not what mmpl writes (and no numpy form)
    save_file(bf16, path, metadata={"task": "k/s000/odd", "hash": "h", "checksum": "x"})
    assert store.load("k/s000/odd", "h") is None
    alpha, anchors = plan.profile.noise_blend, set(plan.profile.layout.plan.targets)
    targets = plan.profile.layout.populate_stage_one.targets  # 4-9: edges at 4 (next to 3, 2) and 9 (next to 10, 11)
    for candidate in range(3):
        got = runner.group_noise(Kind.POPULATE_ONE, 0, candidate, planned=chosen)
        own, planned = runner.noise(0, candidate), runner.noise(0, chosen)
        assert torch.equal(got, blend_edge_noise(own, targets, anchors, alpha, anchor_noise=planned))
        scale = (alpha**2 + (1 - alpha) ** 2) ** 0.5
        assert torch.equal(got[:, 0], (alpha * planned[:, 3] + (1 - alpha) * planned[:, 2]) / scale)
        assert torch.equal(got[:, 1:5], own[:, 5:9])  # inside the run: the candidate's own noise
        if candidate != chosen:
            assert not torch.equal(got, blend_edge_noise(own, targets, anchors, alpha))


def _image(path):
    y, x = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([x * 2, y * 3, 255 - x * 2], -1).astype(np.uint8)).save(path)
    return path


def test_image_to_video_encodes_the_image_alone_and_generates_the_next_latent(backend, tmp_path):
    image = _image(tmp_path / "still.png")
    plan = plan_shot(shot(init_image=image), load_profile("tiny"), "terminal")
    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    initial = runner.run(plan.tasks[0], {}).latents
    pixels = load_init_image(image, 96, 64)
    assert torch.equal(initial[:, 0], backend.encode(pixels[:, None])[:, 0])  # the image alone, one frame
    still = backend.encode(pixels[:, None].expand(-1, 5, -1, -1))[:, :2]  # the old way: a 5-frame freeze
    assert not torch.allclose(initial[:, 1], still[:, 1], atol=1e-2) and not torch.allclose(initial[:, 1], still[:, 0], atol=1e-2)
    frames = backend.decode(initial)  # 5 frames: the image, then 4 generated ones
    assert frames.shape[1] == 5
    assert min(float((frames[:, i] - frames[:, 0]).abs().max()) for i in range(1, 5)) > 0.01  # no frozen copies


@pytest.mark.slow
def test_planning_hand_over_and_image_to_video_render_resume_bit_identically(tiny_model_dir, tmp_path):
    profile = tmp_path / "planning.yaml"
    profile.write_text(TINY.replace("name: tiny", "name: tiny-planning") + '\nhandover: planning\nnegative_prompt: "grey"\n')
    _image(tmp_path / "still.png")
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\ndefaults: {steps: 3, seed: 6}\nshots:\n"
                     "  - {id: k, prompt: a small red circle moving right on a blue background, duration: 9,"
                     " init_image: still.png}\n")
    args = ["render", str(shots), "--profile", str(profile), "--model-path", str(tiny_model_dir)]
    reference = tmp_path / "reference"
    proc = run_cli(*args, "--out", str(reference))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((reference / ".mmpl/manifest.json").read_text())
    assert manifest["shots"][0]["negative_prompt"] == "grey"  # the one used, recorded
    out = tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, "-m", "mmpl_cli", *args, "--out", str(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_start(out, "k/s001/initial", killed)  # the hand-over itself
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    proc = run_cli(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert videos(out) == videos(reference)
