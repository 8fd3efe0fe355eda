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


@pytest.mark.slow
@pytest.mark.parametrize("t", [999.0, 500.0, 3.0])
def test_primitive_without_context_equals_diffusers_forward(backend, t):
    x = _latents(21, 0)
    text = backend.encode_text("a red ball")
    expected = backend.transformer(hidden_states=x[None], timestep=torch.tensor([t]), encoder_hidden_states=text,
                                   return_dict=False)[0][0]
    ours = backend.forward_at(x, list(range(21)), t, text)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def test_explicit_frame_positions_change_the_output(backend):
    """Frame indices must reach RoPE: the same latents at other positions attend differently."""
    x = _latents(3, 1)
    text = backend.encode_text("a red ball")
    at_start = backend.forward_at(x, [0, 1, 2], 500.0, text)
    spread = backend.forward_at(x, [0, 10, 20], 500.0, text)
    assert (at_start - spread).abs().max().item() > 1e-3


def _populate_stage_two_inputs():
    initial = ContextGroup(_latents(2, 2), (0, 1), ())
    plan = ContextGroup(_latents(7, 3), (2, 3, 10, 11, 12, 19, 20), (0, 1))
    stage_one = ContextGroup(_latents(6, 4), (4, 5, 6, 7, 8, 9), (0, 1, 2, 3, 10, 11, 12))
    sees = tuple(range(13)) + (19, 20)
    return [initial, plan, stage_one], sees


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_cached_context_equals_context_recomputed_in_the_same_pass(backend, guidance):
    context, sees = _populate_stage_two_inputs()
    text = backend.text("a harbour at dusk", "blurry", guidance)
    noise = _latents(6, 5)
    sampler = Sampler(steps=4, guidance=guidance)
    cached = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler)
    recomputed = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler, recompute_context=True)
    assert (cached - recomputed).abs().max().item() <= 1e-5


def test_the_context_cache_holds_each_token_once_and_hands_out_views(backend):
    """One buffer per layer for one text, sized by the formula; MMPL's visible sets are slices of it
    (no copy), a set with a hole is gathered."""
    context, _ = _populate_stage_two_inputs()
    text = backend.text("a harbour", "", 1.0).cond
    cache = backend.build_cache(context, text)
    config = backend.transformer.config
    p_h, p_w = config.patch_size[1:]
    tokens = sum(len(g.frames) for g in context) * (context[0].latents.shape[-2] // p_h) * (context[0].latents.shape[-1] // p_w)
    inner = config.num_attention_heads * config.attention_head_dim
    assert cache.nbytes() == config.num_layers * 2 * tokens * inner * 4  # K and V, float32
    buffer = cache.keys[0].untyped_storage().data_ptr()
    for sees in [(0, 1), (0, 1, 2, 3, 10, 11, 12), tuple(range(13)) + (19, 20)]:  # plan, stage one, stage two
        view = cache.visible(sees)
        assert view.keys[0].untyped_storage().data_ptr() == buffer
        assert view.keys[0].shape[1] == len(sees) * tokens // sum(len(g.frames) for g in context)
    holed = cache.visible((0, 1, 19, 20))
    assert holed.keys[0].untyped_storage().data_ptr() != buffer and holed.keys[0].shape[1] == 4 * tokens // 15


@pytest.mark.slow
def test_visibility_list_hides_the_terminal_plan_in_populate_stage_one(backend):
    """Stage one hides 19-20 (MMPL paper, App. C.2): the cached path must match the masked reference with
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


@pytest.mark.slow
def test_a_training_batch_equals_its_samples_one_at_a_time(backend):
    """Training runs one group over a batch of clips at once, each clip at its own noise level and with
    its own caption: every sample's prediction must be what the reference path gives it alone."""
    context, sees = _populate_stage_two_inputs()
    batched = [ContextGroup(torch.stack([g.latents, -g.latents]), g.frames, g.sees) for g in context]
    texts = [backend.encode_text("a red ball"), backend.encode_text("a blue square")]
    x, t = torch.stack([_latents(6, 7), _latents(6, 8)]), torch.tensor([900.0, 80.0])
    targets = tuple(range(13, 19))
    together = backend.reference_evaluator(targets, sees, batched, [torch.cat(texts)])(x, t, 0)
    assert together.shape == x.shape
    for i in range(2):
        alone = [ContextGroup(g.latents[i], g.frames, g.sees) for g in batched]
        expected = backend.reference_evaluator(targets, sees, alone, [texts[i]])(x[i], t[i], 0)
        assert (together[i] - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_full_strategy_equals_diffusers_wan_pipeline(tiny_model_dir, backend, tmp_path):
    profile = load_profile("tiny")
    shot = Shot(id="peer", prompts=(PromptChange(0.0, "a red ball on a blue floor"),), duration=81 / 16, seed=3,
                negative_prompt="blurry", init_image=None, strategy="full", sampler_overrides={"steps": 4}, line=1)
    plan = plan_shot(shot, profile, "terminal")
    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    ours = runner.run(plan.tasks[0], {}).latents

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


def test_search_score_estimates_the_final_colour_from_a_partly_denoised_group():
    from mmpl_cli.sampling import search_score

    context = torch.zeros(16, 2, 8, 12)
    context[0] = 1.0
    x0 = torch.zeros(16, 3, 8, 12)
    x0[0] = 1.0  # the same mean colour as the context
    noise = torch.randn(16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    sigma = 0.6
    near = search_score((1 - sigma) * x0 + sigma * noise, sigma, context)
    far = search_score((1 - sigma) * (x0 + 0.5) + sigma * noise, sigma, context)
    # the noise averages out to about 0.6 / sqrt(288) / 0.4 per channel, 0.35 over 16 channels
    assert near < 0.7 < 1.3 < far  # 0.5 in each of 16 channels is 2.0 away
    assert search_score((1 - sigma) * x0, sigma, context) == pytest.approx(0.0, abs=1e-6)


def _sliding_runner(backend, tmp_path, **sampler):
    profile = load_profile("tiny")
    shot = Shot(id="sw", prompts=(PromptChange(0.0, "a red ball"),), duration=9, seed=5, negative_prompt="",
                init_image=None, strategy="sliding-window", sampler_overrides={"steps": 3, **sampler}, line=1)
    plan = plan_shot(shot, profile, "terminal")
    return ShotRunner(backend, plan, RenderStore(tmp_path)), plan


@pytest.mark.slow
def test_noise_search_keeps_the_candidate_nearest_the_context_in_colour(backend, tmp_path):
    from mmpl_cli.sampling import make_scheduler, search_score

    runner, plan = _sliding_runner(backend, tmp_path, search=3, search_steps=1)
    first = runner.run(plan.tasks[0], {})  # window 0 has no context: no search
    plain, _ = _sliding_runner(backend, tmp_path)
    assert torch.equal(first.latents, plain.run(plan.tasks[0], {}).latents)

    results = {plan.tasks[0].id: first}
    window = next(t for t in plan.tasks if t.kind == "window" and t.segment == 1)
    chosen = runner.run(window, results).latents[:, 5:]
    # by hand: every candidate's first step, scored against the 5 context latents
    context = [ContextGroup(first.latents[:, -5:], tuple(range(5)), ())]
    text, sampler = runner.text(1), plan.sampler
    sigma = float(make_scheduler(sampler).sigmas[1])
    candidates = [runner.noise(1, c)[:, 5:] for c in range(3)]
    scores = [search_score(backend.denoise(n, tuple(range(5, 21)), tuple(range(5)), context, text, sampler,
                                           stop_after=1), sigma, context[0].latents) for n in candidates]
    best = min(range(3), key=scores.__getitem__)
    expected = backend.denoise(candidates[best], tuple(range(5, 21)), tuple(range(5)), context, text, sampler)
    assert torch.equal(chosen, expected)
    assert len({round(s, 6) for s in scores}) == 3  # the candidates really differ


def test_noise_search_settings_enter_the_hash_only_when_used():
    from mmpl_cli.plan import task_hashes

    profile = load_profile("tiny")

    def hashes(**sampler):
        shot = Shot(id="h", prompts=(PromptChange(0.0, "x"),), duration=9, seed=1, negative_prompt="", init_image=None,
                    strategy="mmpl", sampler_overrides=sampler, line=1)
        return task_hashes(plan_shot(shot, profile, "terminal"), "model")

    assert hashes() == hashes(search=1, search_steps=2)  # the defaults: folders from before still resume
    assert hashes() != hashes(search=4)


@pytest.mark.slow
def test_progressive_tasks_equal_one_uninterrupted_progressive_run(backend, tmp_path):
    from mmpl_cli.plan import derive_seed
    from mmpl_cli.sampling import flow_sigma, segment_noise

    profile = load_profile("tiny")
    shot = Shot(id="pg", prompts=(PromptChange(0.0, "a red ball"),), duration=9, seed=2, negative_prompt="",
                init_image=None, strategy="progressive", sampler_overrides={"steps": 3}, line=1)
    plan = plan_shot(shot, profile, "terminal")
    runner = ShotRunner(backend, plan, RenderStore(tmp_path))
    results = {}
    for task in plan.tasks:
        if task.kind == "progressive":
            results[task.id] = runner.run(task, results)
    assert len(results) == 2

    # By hand, PA-VDM's loop over the whole shot with no task boundary: 3 levels (one per step), chunks
    # of 2 latents, each clean chunk kept in front for one more round. Segment 0 needs latents 0-20,
    # so it runs rounds 0-12 (chunk 10, latents 20-21, is clean after round 10 + 3 - 1); segment 1
    # needs latents 16-36 and runs rounds 13-20 (chunk 18). A round's new noise is its segment's.
    levels, c, shift, guidance = 3, 2, plan.sampler.shift, plan.sampler.guidance
    text = runner.text(0)
    window: list[list] = []  # [chunk latents, its noise level]
    stream = []
    for r in range(21):
        seed = plan.segments[0 if r <= 12 else 1].noise_seed
        window.append([segment_noise(derive_seed(seed, f"chunk-{r}"), (16, c, *LATENT_HW)), levels])
        x = torch.cat([latents for latents, _ in window], dim=1)
        before = torch.tensor([flow_sigma(level / levels, shift) for _, level in window for _ in range(c)])
        after = torch.tensor([flow_sigma(max(0, level - 1) / levels, shift) for _, level in window for _ in range(c)])
        x = x + (after - before)[None, :, None, None] * backend.flow_at_levels(x, before * 1000.0, text, guidance)
        # the chunk that was clean before this round leaves; one that became clean now is the stream's next
        window = [[x[:, i * c:(i + 1) * c], level - 1] for i, (_, level) in enumerate(window) if level > 0]
        if window[0][1] == 0:
            stream.append(window[0][0])
    stream = torch.cat(stream, dim=1)
    assert stream.shape[1] == 38
    assert torch.equal(results["pg/s000/progressive"].latents, stream[:, 0:21])
    assert torch.equal(results["pg/s001/progressive"].latents, stream[:, 16:37])
    assert stream.abs().max() < 100  # finite, not blown up


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_rope_in_float32_and_the_text_encoder_out_of_float16(tiny_model_dir, dtype):
    from mmpl_cli.wan import WanBackend

    backend = WanBackend.from_folder(tiny_model_dir, dtype=dtype, max_sequence_length=32)
    assert backend.transformer.rope.stock.freqs_cos.dtype == torch.float32
    assert next(backend.transformer.blocks[0].attn1.parameters()).dtype == getattr(torch, dtype)
    assert next(backend.pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert backend.encode_text("a red ball").dtype == getattr(torch, dtype)
