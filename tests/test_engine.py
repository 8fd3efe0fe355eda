"""Peer checks of the engine primitive against diffusers, and the context cache against recomputation."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

from mmpl_cli.plan import plan_shot
from mmpl_cli.profiles import Sampler, load_profile
from mmpl_cli.render import ShotRunner
from mmpl_cli.sampling import blend_edge_noise
from mmpl_cli.store import RenderStore
from mmpl_cli.shotlist import PromptChange, Shot
from mmpl_cli.wan import ContextGroup

LATENT_HW = (8, 12)  # the tiny profile's 96x64 pixels


def _latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(16, frames, *LATENT_HW, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [999.0, 500.0, 3.0])
def test_primitive_without_context_equals_diffusers_forward(backend, t):
    x = _latents(21, 0)
    text = backend.encode_text("a red ball")
    expected = backend.transformer(hidden_states=x[None], timestep=torch.tensor([t]), encoder_hidden_states=text,
                                   return_dict=False)[0][0]
    ours = backend._forward(x, list(range(21)), t, text)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def test_explicit_frame_positions_change_the_output(backend):
    """Frame indices must reach RoPE: the same latents at other positions attend differently."""
    x = _latents(3, 1)
    text = backend.encode_text("a red ball")
    at_start = backend._forward(x, [0, 1, 2], 500.0, text)
    spread = backend._forward(x, [0, 10, 20], 500.0, text)
    assert (at_start - spread).abs().max().item() > 1e-3


def _populate_stage_two_inputs():
    initial = ContextGroup(_latents(2, 2), (0, 1), ())
    plan = ContextGroup(_latents(7, 3), (2, 3, 10, 11, 12, 19, 20), (0, 1))
    stage_one = ContextGroup(_latents(6, 4), (4, 5, 6, 7, 8, 9), (0, 1, 2, 3, 10, 11, 12))
    sees = tuple(range(13)) + (19, 20)
    return [initial, plan, stage_one], sees


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_cached_context_equals_context_recomputed_in_the_same_pass(backend, guidance):
    context, sees = _populate_stage_two_inputs()
    text = backend.text("a harbour at dusk", "blurry", guidance)
    noise = _latents(6, 5)
    sampler = Sampler(steps=4, guidance=guidance)
    cached = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler)
    recomputed = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler, recompute_context=True)
    assert (cached - recomputed).abs().max().item() <= 1e-5


def test_visibility_list_hides_the_terminal_plan_in_populate_stage_one(backend):
    """Stage one hides 19-20 (seeds/001 App. C.2): the cached path must match the masked reference with
    them hidden, and differ from letting them be seen."""
    (initial, plan, _), _ = _populate_stage_two_inputs()
    text = backend.text("a harbour", "", 1.0)
    targets, sees = tuple(range(4, 10)), (0, 1, 2, 3, 10, 11, 12)
    noise = _latents(6, 6)
    sampler = Sampler(steps=2, guidance=1.0)
    hidden = backend.denoise(noise, targets, sees, [initial, plan], text, sampler)
    reference = backend.denoise(noise, targets, sees, [initial, plan], text, sampler, recompute_context=True)
    seen = backend.denoise(noise, targets, sees + (19, 20), [initial, plan], text, sampler)
    assert (hidden - reference).abs().max().item() <= 1e-5
    assert (hidden - seen).abs().max().item() > 1e-4


def test_full_strategy_equals_diffusers_wan_pipeline(tiny_model_dir, backend, tmp_path):
    profile = load_profile("tiny")
    shot = Shot(id="peer", prompts=(PromptChange(0.0, "a red ball on a blue floor"),), duration=81 / 16, seed=3,
                negative_prompt="blurry", init_image=None, strategy="full", sampler_overrides={"steps": 4}, line=1)
    plan = plan_shot(shot, profile, "terminal")
    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    ours = runner.run(plan.tasks[0], {})["latents"]

    # diffusers' own pipeline, loaded fresh from the same folder (no mmpl modules installed)
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder"),
        transformer=WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer"),
        vae=AutoencoderKLWan.from_pretrained(tiny_model_dir / "vae"),
        scheduler=UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=5.0),
    )
    reference = pipe(prompt="a red ball on a blue floor", negative_prompt="blurry", height=64, width=96,
                     num_frames=81, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=32,
                     generator=torch.Generator().manual_seed(plan.segments[0].noise_seed),
                     output_type="latent").frames[0]
    assert reference.shape == ours.shape
    assert (reference - ours).abs().max().item() <= 1e-5


def test_edge_noise_blends_neighbouring_planning_noise():
    noise = torch.randn(16, 21, 2, 2, generator=torch.Generator().manual_seed(0))
    targets = (4, 5, 6, 7, 8, 9)
    anchors = {2, 3, 10, 11, 12, 19, 20}
    out = blend_edge_noise(noise, targets, anchors, alpha=0.75)
    scale = (0.75**2 + 0.25**2) ** 0.5
    assert torch.allclose(out[:, 0], (0.75 * noise[:, 3] + 0.25 * noise[:, 2]) / scale)
    assert torch.allclose(out[:, 5], (0.75 * noise[:, 10] + 0.25 * noise[:, 11]) / scale)
    assert torch.equal(out[:, 1:5], noise[:, 5:9])  # inner latents keep their own noise
    # the plan itself: no run of it has two planning latents outside it, so its noise is untouched
    plan = (2, 3, 10, 11, 12, 19, 20)
    assert torch.equal(blend_edge_noise(noise, plan, anchors, 0.75), noise[:, list(plan)])
