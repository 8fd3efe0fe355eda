"""Device discipline, checked on a CPU: what crosses the backend's boundary lives on the CPU in
float32, everything between lives on the model's device. The model runs on a stand-in device
(standin.py) that refuses to mix with CPU tensors as CUDA does, so a render, the training step's
backend calls and each backend call fail here the way they would fail on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import render_here
from mmpl_cli.profiles import Sampler
from standin import OnDevice, StandInDevice

# Every strategy, noise search, image-to-video and the storyboard; hand-overs in m, w and p (2 segments
# each; i and f are one segment, so image-to-video is not followed by a hand-over here).
SHOTS = """version: 1
defaults: {steps: 2, seed: 5}
shots:
  - {id: m, prompt: "a red ball", duration: 6, search: 2, search_steps: 1}
  - {id: i, prompt: "a red ball", duration: 3, init_image: still.png}
  - {id: f, prompt: "a red ball", duration: 5, strategy: full}
  - {id: w, prompt: "a red ball", duration: 6, strategy: sliding-window, search: 2, search_steps: 1}
  - {id: p, prompt: "a red ball", duration: 6, strategy: progressive}
  - {id: c, prompt: "a red ball", duration: 1, strategy: causal, scheduler: few-step, timesteps: [1000], guidance: 1}
"""


def _latents(out):
    from safetensors.torch import load_file

    return {str(p.relative_to(out)): load_file(p) for p in sorted((out / ".mmpl" / "tasks").rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-shots")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "still.png")
    (folder / "shots.yaml").write_text(SHOTS)
    return folder / "shots.yaml"


@pytest.mark.slow
def test_a_render_on_another_device_than_the_cpu(shots, tiny_model_dir, tmp_path):
    """Every task kind of every strategy, noise search, the hand-over's decode and encode, segment
    decode, the storyboard and stitching, with the model on the stand-in device; the results are the
    CPU's, bit for bit (the stand-in computes with the CPU's kernels)."""
    with StandInDevice() as device:
        videos = render_here(shots, tmp_path / "dev", tiny_model_dir, str(device), storyboard=True)
    assert all(v.exists() for v in videos) and len(videos) == 6
    cpu = tmp_path / "cpu"
    render_here(shots, cpu, tiny_model_dir, storyboard=True)
    on_device, on_cpu = _latents(tmp_path / "dev"), _latents(cpu)
    assert on_device.keys() == on_cpu.keys() and len(on_cpu) == 18  # m 8, i 4, f 1, w 2, p 2, c 1 latent task files
    for name, tensors in on_cpu.items():
        for key, value in tensors.items():
            assert torch.equal(on_device[name][key], value), (name, key)


@pytest.mark.slow
def test_backend_calls_take_and_give_cpu_float32(tiny_model_dir):
    """Each call's inputs on the CPU, its outputs on the CPU in float32 (text embeddings are the
    backend's own handle and stay on the device)."""
    from mmpl_cli.wan import ContextGroup, WanBackend

    with StandInDevice() as device:
        backend = WanBackend.from_folder(tiny_model_dir, device=str(device), max_sequence_length=32)
        assert isinstance(next(backend.transformer.parameters()), OnDevice)
        text = backend.text("a red ball", "blurry", 3.0)
        z = backend.vae.config.z_dim
        clean = ContextGroup(torch.randn(z, 2, 8, 12), (0, 1), ())
        outputs = {
            "denoise": backend.denoise(torch.randn(z, 2, 8, 12), (2, 3), (0, 1), [clean], text, Sampler(steps=2)),
            "denoise, recomputed context": backend.denoise(torch.randn(z, 2, 8, 12), (2, 3), (0, 1), [clean], text,
                                                           Sampler(steps=2), recompute_context=True),
            "rollout": backend.rollout(torch.randn(z, 4, 8, 12), [(2, 3), (4, 5)], [clean], text, Sampler(steps=2)),
            "flow_at_levels": backend.flow_at_levels(torch.randn(z, 3, 8, 12), torch.tensor([0.0, 500.0, 900.0]),
                                                     text, 3.0),
            "decode": backend.decode(torch.randn(z, 3, 8, 12)),
            "encode": backend.encode(torch.rand(3, 5, 64, 96) * 2 - 1),
        }
    for name, out in outputs.items():
        assert type(out) is torch.Tensor and out.device.type == "cpu" and out.dtype == torch.float32, name


def test_training_step_on_another_device(tiny_model_dir):
    """The backend calls a training step makes (teacher forcing through the masked evaluator, and
    the progressive loss's per-frame levels), with gradients, on the stand-in device."""
    from mmpl_cli.wan import ContextGroup, WanBackend

    with StandInDevice() as device:
        backend = WanBackend.from_folder(tiny_model_dir, device=str(device), max_sequence_length=32)
        backend.transformer.requires_grad_(True)
        z = backend.vae.config.z_dim
        text = backend.prompt_embeds(["a red ball", "a blue cube"])
        clean = ContextGroup(torch.randn(2, z, 2, 8, 12), (0, 1), ())
        evaluate = backend.reference_evaluator((2, 3), (0, 1), [clean], [text])
        target = torch.randn(2, z, 2, 8, 12)
        loss = (evaluate(torch.randn(2, z, 2, 8, 12), torch.tensor([300.0, 700.0]), 0) - target.to(device)).pow(2).mean()
        levels = backend.forward_at(torch.randn(2, z, 3, 8, 12), range(3), 0.0, text,
                                  frame_timesteps=torch.tensor([[0.0, 400.0, 800.0], [100.0, 500.0, 900.0]]))
        loss = loss + levels.pow(2).mean()
        loss.backward()
        grads = [p.grad for p in backend.transformer.parameters() if p.grad is not None]
    assert grads and all(isinstance(g, OnDevice) for g in grads)
    assert np.isfinite(loss.detach().cpu().item())


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py is the command to run the first time a GPU is at hand: CI keeps it alive."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["renders"]) == {"native/terminal", "native/midpoint", "few-step/causal"}
    assert result["renders"]["few-step/causal"]["frames_per_s"] > 0
    assert "populate_stage_two" in result["renders"]["native/terminal"]["tasks"]
    assert "populate_stage_two" not in result["renders"]["native/midpoint"]["tasks"]  # mid-point never fills 13-18
    assert result["cache_vs_recomputed_rel"] < 1e-4


@pytest.mark.slow
def test_the_context_cache_on_the_device_is_one_copy_per_text(tiny_model_dir):
    """Measured with the stand-in's meter (bytes held on the device, as torch.cuda.memory_allocated counts
    them): building a stage-two cache leaves exactly the formula's bytes on the device, reading what a
    group sees allocates nothing, and the second text of a guided denoise costs one more cache."""
    import gc

    from mmpl_cli.wan import ContextGroup, WanBackend
    from standin import Meter

    with StandInDevice() as device:
        backend = WanBackend.from_folder(tiny_model_dir, device=str(device), max_sequence_length=32)
        text = backend.text("a red ball", "blurry", 3.0)
        z, config = backend.vae.config.z_dim, backend.transformer.config
        context = [ContextGroup(torch.randn(z, 2, 8, 12), (0, 1), ()),
                   ContextGroup(torch.randn(z, 7, 8, 12), (2, 3, 10, 11, 12, 19, 20), (0, 1)),
                   ContextGroup(torch.randn(z, 6, 8, 12), tuple(range(4, 10)), (0, 1, 2, 3, 10, 11, 12))]
        tokens = 15 * (8 // 2) * (12 // 2)
        formula = config.num_layers * 2 * tokens * config.num_attention_heads * config.attention_head_dim * 4
        gc.collect()
        before = Meter.live
        cache = backend.build_cache(context, text.cond)
        gc.collect()
        assert Meter.live - before == formula
        base = Meter.reset()
        view = cache.visible(tuple(range(13)) + (19, 20))  # what stage two sees: all of it, as a view
        assert Meter.peak == base and view.keys[0].shape[1] == tokens
        del cache, view
        held = {}
        for guidance in (1.0, 3.0):  # one text, then two
            gc.collect()
            base = Meter.reset()
            backend.denoise(torch.randn(z, 6, 8, 12), tuple(range(13, 19)), tuple(range(13)) + (19, 20), context,
                            text, Sampler(steps=2, guidance=guidance))
            held[guidance] = Meter.peak - base
    # the second text costs its cache and the cond output kept beside the uncond one, not another copy
    assert formula <= held[3.0] - held[1.0] < 1.1 * formula, (held, formula)
