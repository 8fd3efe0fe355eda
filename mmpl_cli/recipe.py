"""What each training step computes: the MMPL fine-tuning recipe (MMPL paper, Sec. 4, App. C.1,
Table 3) on the same engine primitive the renderer uses, and the autoencoder training before it.

Teacher forcing: each step takes a batch of clean clips, picks one group of a segment (the MMPL groups:
initial, plan, populate stage one and two, each with the context and visibility it has at render
time; or a contiguous continuation window, or a full window, for the baselines), noises the
group's target latents with flow matching and regresses the velocity, with the clean context run
through the model in the same pass under the block-visibility mask (`WanBackend` reference path,
which the tests check equals the cached path). Only the chosen parameter subset trains
(`all | self_attention | qk`).

A stage function loads its model from the model folder and returns a `Stage`: the parameters that
train, the loss of step i (its data and noise a function of (seed, stage, i) alone) and what to save
once the last step ran. It knows nothing of optimizers, checkpoints, resuming or deadlines: those
are train.py's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from mmpl_cli.dataset import ClipSource, Pool, encode_pool, to_model_pixels
from mmpl_cli.errors import InputError, Problem
from mmpl_cli.terms import GROUPS, Kind

if TYPE_CHECKING:
    from mmpl_cli.train_config import StageConfig

TRAINABLE = ("all", "self_attention", "qk")
# what a training sample teaches: MMPL's groups, a continuation (a window conditioned on the previous
# latents, the sliding-window baseline's task), a whole window, a progressive window
TRAIN_GROUPS = tuple(str(k) for k in (*GROUPS, "continuation", Kind.FULL, Kind.PROGRESSIVE))
PROGRESSIVE_START = 1 / 3  # progressive samples that are the start of a shot (no clean chunk yet)
CFG_DROPOUT = 0.1  # captions replaced by "" this often, so classifier-free guidance has an unconditional model


class Setup(NamedTuple):
    """Where and how a stage runs (train.py's decisions): the device, this process among `processes`,
    accelerate's `prepare` (the data-parallel wrapper of a module), checkpointed activations, and
    the pool folder (prepared: it holds caption embeddings too, and no VAE or text encoder is loaded)."""
    device: str
    rank: int
    processes: int
    prepare: Callable[[torch.nn.Module], torch.nn.Module]
    wait: Callable[[], None]  # every process meets here
    checkpointing: bool
    pool: Path
    prepared: bool
    message: Callable[[str], None]
    name: str


class Stage(NamedTuple):
    """One stage, ready to run: what trains, the loss of step i over rows `rows` of its global batch
    (the mean over those rows), and what to save after the last step. `module` is the wrapper whose
    gradients accelerate synchronises across processes (None: none is); the loop averages the
    gradients of `replicated` parameters itself."""
    params: dict[str, torch.nn.Parameter]
    step_loss: Callable[[int, slice], torch.Tensor]
    finish: Callable[[], None]
    module: torch.nn.Module | None = None
    replicated: tuple[torch.nn.Parameter, ...] = ()


def _seeded(seed: int, stage: int, step: int) -> tuple[random.Random, torch.Generator]:
    """A step's random sources, from (seed, stage, step) alone: a resumed run draws what an uninterrupted one would."""
    key = (seed * 1_000_003 + stage) * 1_000_003 + step
    return random.Random(key), torch.Generator().manual_seed(key % (1 << 63))


# --------------------------------------------------------------------------------------------
# What trains


def trainable_names(names: list[str], subset: str) -> list[str]:
    """The parameter subsets of a Wan transformer in the MMPL paper's Table 3: everything, self-attention
    only, or its q/k."""
    if subset == "all":
        return names
    if subset == "self_attention":
        return [n for n in names if ".attn1." in n]
    return [n for n in names if ".attn1.to_q." in n or ".attn1.to_k." in n]


def group_for(kind: str, layout, rng: random.Random):
    """(target frames, frames they see, context groups as (frames, sees)) for one training group,
    exactly as the renderer runs them."""
    if kind == "full":
        return tuple(range(layout.latents)), (), []
    if kind == "continuation":  # a window conditioned on the previous latents (sliding-window baseline)
        split = rng.randrange(1, layout.latents - 1)
        before = tuple(range(split))
        return tuple(range(split, layout.latents)), before, [(before, ())]
    context = [(layout.group(k).targets, layout.group(k).sees) for k in GROUPS[:GROUPS.index(kind)]]
    group = layout.group(kind)
    return group.targets, group.sees, context


def progressive_window(latents: int, levels: int, chunk: int, rng: random.Random,
                       shot_start: bool) -> tuple[int, list[float]]:
    """(first latent, level in [0, 1] of every latent) of one progressive training window (PA-VDM,
    Sec. 3.3): chunk i of the noisy ones at level (i + u) / levels, u drawn once per window in (0, 1],
    behind one clean chunk at level 0. The render runs the same windows at u = 1, one level apart
    before each step. A shot's first windows (`shot_start`) have no clean chunk yet and only the
    noisiest m chunks; those start at the clip's first latent, as a shot does."""
    u = 1.0 - rng.random()
    if shot_start:
        m = rng.randint(1, levels)
        return 0, [(levels - m + i + u) / levels for i in range(m) for _ in range(chunk)]
    start = rng.randrange(0, latents - chunk * (levels + 1) + 1)
    return start, [0.0] * chunk + [(i + u) / levels for i in range(levels) for _ in range(chunk)]


# --------------------------------------------------------------------------------------------
# The autoencoder


def anchor_latents(pixels: torch.Tensor, z_dim: int, spatial: int = 8, temporal: int = 4) -> torch.Tensor:
    """Fixed target latents for a VAE trained from scratch: per latent cell (the first frame alone, then
    `temporal` frames, by `spatial` x `spatial` pixels) the mean colour and the four quadrants' colours
    relative to it, mixed into all `z_dim` channels by a fixed orthogonal matrix and scaled to about unit
    variance. [B, 3, F, H, W] in [-1, 1] -> [B, z_dim, latent frames, H/spatial, W/spatial].

    Why: a Wan VAE trained end to end from random weights on six far-apart colours stalls for
    thousands of steps with every colour decoded to one of two (its per-pixel RMS norms leave the
    decoder blind to the encoder's small, correlated initial latents). Given well-spread target
    latents, the decoder learns in a few hundred steps and the encoder learns to produce them; then
    end-to-end training improves on them while a small pull keeps the latents near them."""
    parts = []
    for chunk, t in ((pixels[:, :, :1], 1), (pixels[:, :, 1:], temporal)):
        if chunk.shape[2] == 0:
            continue
        cell = torch.nn.functional.avg_pool3d(chunk, (t, spatial, spatial))
        quarter = torch.nn.functional.avg_pool3d(chunk, (t, spatial // 2, spatial // 2))
        quarter = quarter - cell.repeat_interleave(2, 3).repeat_interleave(2, 4)
        b, c, k, h, w = cell.shape
        quarter = quarter.view(b, c, k, h, 2, w, 2).permute(0, 1, 4, 6, 2, 3, 5).reshape(b, 4 * c, k, h, w)
        pad = torch.zeros(b, z_dim - 5 * c, k, h, w, dtype=pixels.dtype, device=pixels.device)
        parts.append(torch.cat([1.5 * cell, 3.0 * quarter, pad], 1))
    mix, _ = torch.linalg.qr(torch.randn(z_dim, z_dim, generator=torch.Generator().manual_seed(0)))
    return torch.einsum("dc,bcthw->bdthw", 2.5 * mix.to(pixels.device), torch.cat(parts, 2))


def chunked_reconstruction(vae, pixels: torch.Tensor, start: int, window: int):
    """Encode and decode latents start .. start + window - 1 of a clip one at a time, carrying the
    causal caches of encoder and decoder along as diffusers' encode and decode do, with no gradient
    up to `start`. Returns (latents, decoder output before the clamp, the pixels they stand for).

    Why: a Wan VAE trained on short clips never sees the cache state of its later latents, and
    drifts there (on the tiny default, L1 0.04 on frames 0-4, 0.6 from frame 20 of an 81-frame
    window). This trains every position of a long clip for about the price of a short one."""
    z_dim = vae.config.z_dim
    enc_cache = [None] * vae._cached_conv_counts["encoder"]
    dec_cache = [None] * vae._cached_conv_counts["decoder"]

    def run(i: int):
        part = pixels[:, :, :1] if i == 0 else pixels[:, :, 1 + 4 * (i - 1):1 + 4 * i]
        z = vae.quant_conv(vae.encoder(part, feat_cache=enc_cache, feat_idx=[0]))[:, :z_dim]  # posterior mode
        out = vae.decoder(vae.post_quant_conv(z), feat_cache=dec_cache, feat_idx=[0], first_chunk=i == 0)
        return z, out, part

    with torch.no_grad():
        for i in range(start):
            run(i)
    parts = [run(i) for i in range(start, start + window)]
    return tuple(torch.cat([p[k] for p in parts], dim=2) for k in range(3))


def reconstruction_loss(out: torch.Tensor, pixels: torch.Tensor, detail_weight: float) -> torch.Tensor:
    """L1 between decoded and true pixels [B, 3, F, H, W], a weighted mean in which every pixel that
    differs from its frame's median colour (by more than 0.1 in some channel) weighs 1 + detail_weight.

    Why: the procedural shapes cover a small part of a frame (2 to 11%; dev/LOG.md, 2026-12-02), and
    a tiny VAE trained on the plain L1 learns the backgrounds and blurs the shapes away (gone from the
    later latents of a window entirely), so no denoiser trained on its latents can draw them."""
    error = (out - pixels).abs()
    if not detail_weight:
        return error.mean()
    median = pixels.flatten(3).median(dim=3).values[..., None, None]
    away = ((pixels - median).abs() > 0.1).any(dim=1, keepdim=True)
    weight = 1.0 + detail_weight * away.to(pixels.dtype)
    return (weight * error).mean() / weight.mean()


def vae_stage(model_dir: Path, profile, source: ClipSource, cfg: StageConfig, setup: Setup, seed: int,
              index: int) -> Stage:
    """The autoencoder learns to reconstruct clips, first (`anchor` steps) its decoder from anchor
    latents. Its many entry points (encoder, decoder, causal caches) leave it unwrapped: with
    several processes the loop averages its gradients (a small model)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, use_safetensors=True)
    vae.to(setup.device).train()
    params = dict(vae.named_parameters())
    z_dim = vae.config.z_dim
    anchored_stage = cfg.anchor > 0 or cfg.anchor_weight > 0
    if anchored_stage and z_dim < 15:
        raise InputError(Problem(str(model_dir / "vae"), None, "anchor",
                                 f"anchor latents need z_dim of at least 15, this VAE has {z_dim}"))

    # diffusers clamps the decoded video to [-1, 1], which stops the gradient of every pixel out of
    # range (most of them, at first): the loss reads the decoder's own output, before the clamp
    raw: list[torch.Tensor] = []
    vae.decoder.register_forward_hook(lambda module, args, out: raw.append(out))

    def step_loss(step: int, rows: slice) -> torch.Tensor:
        rng, _ = _seeded(seed, index, step)
        clips = [rng.randrange(1 << 30) for _ in range(cfg.batch)][rows]
        x = torch.stack([to_model_pixels(source.clip(c, cfg.frames)[0]) for c in clips]).to(setup.device)
        if cfg.window:
            start = rng.randrange(1 + (cfg.frames - 1) // 4 - cfg.window + 1)
            z, out, part = chunked_reconstruction(vae, x, start, cfg.window)
            raw.clear()
            loss = reconstruction_loss(out, part, cfg.detail_weight)
            if anchored_stage:
                target = anchor_latents(x, z_dim)[:, :, start:start + cfg.window]
                loss = loss + cfg.anchor_weight * (z - target).pow(2).mean()
            return loss
        z = vae.encode(x).latent_dist.mode()  # what rendering encodes with
        anchored = step < cfg.anchor
        target = anchor_latents(x, z_dim) if anchored_stage else None
        raw.clear()
        vae.decode(target if anchored else z)
        loss = reconstruction_loss(torch.cat(raw, dim=2), x, cfg.detail_weight)  # one decoder call per latent frame
        if target is not None:
            loss = loss + (1.0 if anchored else cfg.anchor_weight) * (z - target).pow(2).mean()
        return loss

    def finish() -> None:
        vae.eval().cpu()
        _set_latent_statistics(vae, source, cfg.frames, setup.message, setup.name)
        vae.save_pretrained(model_dir / "vae", safe_serialization=True)

    return Stage(params, step_loss, finish, replicated=tuple(params.values()))


def _set_latent_statistics(vae, source: ClipSource, frames: int, message, name, clips: int = 32) -> None:
    """Store the trained encoder's per-channel latent mean and std in the VAE config (Wan's are for
    Wan's VAE), so the latents the transformer sees are standardized, as flow matching assumes."""
    with torch.no_grad():
        z = torch.cat([vae.encode(to_model_pixels(source.clip(20_000_000 + i, frames)[0])[None]).latent_dist.mode()
                       for i in range(clips)])
    dims = (0, 2, 3, 4)
    mean, std = z.mean(dim=dims), z.std(dim=dims).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                           latents_std=[round(float(v), 5) for v in std])
    message(f"{name}: latent statistics from {clips} clips: mean |{float(mean.abs().mean()):.3f}|, "
            f"std {float(std.mean()):.3f}")


# --------------------------------------------------------------------------------------------
# The denoiser


def transformer_stage(model_dir: Path, profile, source: ClipSource, cfg: StageConfig, setup: Setup, seed: int,
                      index: int) -> Stage:
    """The denoiser, teacher-forced on the render's groups over a pool of VAE-encoded clips."""
    from mmpl_cli.plan import PROGRESSIVE_CHUNK, progressive_levels
    from mmpl_cli.sampling import flow_sigma
    from mmpl_cli.wan import ContextGroup, WanBackend, checkpoint_blocks

    message, name = setup.message, setup.name
    prepared = setup.prepared and not cfg.text_encoder  # a trained text encoder encodes every caption anew
    backend = WanBackend.from_folder(model_dir, device=setup.device, dtype="float32", attention="native",
                                     max_sequence_length=profile.max_sequence_length, transformer_only=prepared)
    if not setup.prepared:  # the stage's own pool, its shards shared out among the processes
        encode_pool(setup.pool, lambda: {**source.identity(), "frames": profile.segment_frames}, cfg.pool, backend,
                    source, profile.segment_frames, texts=False, rank=setup.rank, processes=setup.processes,
                    wait=setup.wait, message=message, name=name)
    pool = Pool(setup.pool, cfg.pool)
    layout, shift = profile.layout, profile.sampler.shift
    everything = list(range(cfg.pool))
    starts = [i for i in everything if pool.first(i) == 0] or everything
    model = backend.transformer
    model.train()
    if setup.checkpointing:
        checkpoint_blocks(model)
    names = trainable_names([n for n, _ in model.named_parameters()], cfg.trainable)
    params = dict(model.named_parameters())
    params = {n: params[n] for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    backend.call = setup.prepare(model)  # accelerate: data parallel across processes, mixed precision
    text_encoder = backend.pipe.text_encoder
    replicated: tuple[torch.nn.Parameter, ...] = ()
    if cfg.text_encoder:
        text_encoder.requires_grad_(True).train()
        params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()})
        replicated = tuple(text_encoder.parameters())
    elif text_encoder is not None:
        text_encoder.requires_grad_(False)
    message(f"{name}: {sum(p.numel() for p in params.values()):,} trainable parameters ({cfg.trainable}"
            f"{', and the text encoder' if cfg.text_encoder else ''}), groups {', '.join(cfg.groups)}"
            f"{', latents and captions prepared' if prepared else ''}")

    def encode(clips: list[int | None]) -> torch.Tensor:
        """[B, tokens, dim] for pool clips (None: the empty caption): prepared embeddings, or a trained
        text encoder's anew, or a frozen one's once per caption (cached, no gradient)."""
        if prepared:
            return torch.cat([pool.text(i) for i in clips]).to(setup.device)
        prompts = ["" if i is None else pool.caption(i) for i in clips]
        if cfg.text_encoder:
            return backend.prompt_embeds(prompts)
        return torch.cat([backend.encode_text(p) for p in prompts])

    levels = progressive_levels(layout.latents, profile.sampler.steps)

    def progressive_loss(latents: torch.Tensor, text: torch.Tensor, shot_start: bool, rng: random.Random,
                         gen: torch.Generator, rows: slice):
        start, level = progressive_window(layout.latents, levels, PROGRESSIVE_CHUNK, rng, shot_start)
        sigma = torch.tensor([flow_sigma(v, shift) for v in level])
        clean = latents[:, :, start:start + len(level)]
        noise = torch.randn((cfg.batch, *clean.shape[1:]), generator=gen)[rows]
        noisy = (1 - sigma)[:, None, None] * clean + sigma[:, None, None] * noise
        prediction = backend.forward_at(noisy, range(len(level)), 0.0, text, frame_timesteps=sigma * 1000.0)
        noisy_frames = sigma > 0  # the clean chunk in front is input only
        target = (noise - clean)[:, :, noisy_frames].to(prediction.device)
        return torch.nn.functional.mse_loss(prediction[:, :, noisy_frames], target)

    def step_loss(step: int, rows: slice) -> torch.Tensor:
        """One group for the whole batch, so the batch runs as one tensor (on a 2-core CPU, about 1.5 times
        the samples per second of one sample at a time). A group that begins a shot (initial, full,
        progressive's start-up windows) learns only from clips that begin their video: the caption's
        direction is the shape's there, while a later window may show it after a bounce. Every draw is
        made for the whole batch, so rows of it give what the whole batch's rows would."""
        rng, gen = _seeded(seed, index, step)
        kind = cfg.groups[rng.randrange(len(cfg.groups))]
        shot_start = kind in ("initial", "full") or (kind == "progressive" and rng.random() < PROGRESSIVE_START)
        choices = starts if shot_start else everything
        clips = [choices[rng.randrange(len(choices))] for _ in range(cfg.batch)]
        captions = [None if rng.random() < CFG_DROPOUT else i for i in clips][rows]
        latents = torch.stack([pool.latents(i) for i in clips[rows]])  # [b, C, F, H, W]: this process's rows
        text = encode(captions)
        if kind == "progressive":
            return progressive_loss(latents, text, shot_start, rng, gen, rows)
        targets, sees, context = group_for(kind, layout, rng)
        sigma = torch.tensor([flow_sigma(rng.random(), shift) for _ in clips])[rows, None, None, None, None]
        clean = latents[:, :, list(targets)]
        noise = torch.randn((cfg.batch, *clean.shape[1:]), generator=gen)[rows]
        noisy = (1 - sigma) * clean + sigma * noise
        groups = [ContextGroup(latents[:, :, list(frames)], frames, group_sees) for frames, group_sees in context]
        evaluate = backend.reference_evaluator(targets, sees, groups, [text])
        prediction = evaluate(noisy, sigma.flatten() * 1000.0, 0)
        return torch.nn.functional.mse_loss(prediction, (noise - clean).to(prediction.device))

    def finish() -> None:
        model.eval()
        model.save_pretrained(model_dir / "transformer", safe_serialization=True)
        if cfg.text_encoder:
            text_encoder.eval()
            text_encoder.save_pretrained(model_dir / "text_encoder", safe_serialization=True)

    return Stage(params, step_loss, finish, module=backend.call, replicated=replicated)
