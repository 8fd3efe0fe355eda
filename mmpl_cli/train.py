"""`mmpl train CONFIG.yaml`: the MMPL fine-tuning recipe (seeds/001 Sec. 4, App. C.1, Table 3) on the
same engine primitive the renderer uses.

Teacher forcing: each step takes a batch of clean clips, picks one group of a segment (the MMPL groups:
initial, plan, populate stage one and two, each with the context and visibility it has at render
time; or a contiguous continuation window, or a full window, for the baselines), noises the
group's target latents with flow matching and regresses the velocity, with the clean context run
through the model in the same pass under the block-visibility mask (`WanBackend` reference path,
which the tests check equals the cached path). Only the chosen parameter subset trains
(`all | self_attention | qk`), with AdamW and gradient clipping.

A config runs one or more stages in order (`vae` trains the autoencoder on clips, `transformer`
the denoiser); each stage checkpoints atomically every `checkpoint_every` steps and a rerun of the
same command resumes from the last checkpoint. Every step's data and noise come from (seed, step),
so a resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.yamlio import Fields, Located, load_yaml

STAGES = ("vae", "transformer")
TRAINABLE = ("all", "self_attention", "qk")
GROUPS = ("initial", "plan", "populate_stage_one", "populate_stage_two", "continuation", "full", "progressive")
LR_DECAY = ("none", "cosine")
PROGRESSIVE_START = 1 / 3  # progressive samples that are the start of a shot (no clean chunk yet)
CFG_DROPOUT = 0.1  # captions replaced by "" this often, so classifier-free guidance has an unconditional model
POOL_BATCH = 8  # clips the VAE encodes at once for the pool


@dataclass(frozen=True)
class StageConfig:
    stage: str
    steps: int
    lr: float
    weight_decay: float
    clip_grad: float
    trainable: str
    groups: tuple[str, ...]
    checkpoint_every: int
    frames: int  # vae: pixel frames per clip
    pool: int  # transformer: clips encoded once and sampled from
    batch: int  # clips per step
    anchor: int  # vae: steps that train the decoder on anchor latents (see anchor_latents)
    anchor_weight: float  # vae: after those (or throughout, with anchor 0), how strongly latents are held to the anchor
    lr_decay: str  # "none" or "cosine" (to a tenth of lr by the last step)
    window: int  # vae: latents trained per step after a gradient-free run up to a random one (0: whole clips)
    text_encoder: bool = False  # transformer: train the text encoder along (a new one barely encodes word order)
    detail_weight: float = 0.0  # vae: pixels away from their frame's median colour weigh 1 + this in the loss


@dataclass(frozen=True)
class TrainConfig:
    path: Path
    out: Path
    model: str  # a Diffusers-format folder, builtin:tiny, or "new" (the tiny architecture, word tokenizer)
    profile: str
    data_source: str  # "procedural" or a folder of clip.mp4 + clip.txt
    seed: int
    stages: tuple[StageConfig, ...]


def load_train_config(path: Path) -> TrainConfig:
    data = load_yaml(path, "training config")
    problems: list[Problem] = []
    f = Fields(str(path), problems)
    root = f.mapping(data, getattr(data, "line", 1), "") or Located()
    f.unknown_keys(root, {"version", "out", "model", "profile", "data", "seed", "stages"}, "")
    version = f.get(root, "version", "", "int", required=True, default=1)
    if version != 1:
        f.add(f.line_of(root, "version"), "version", f"expected 1, found {version}")
    out = f.get(root, "out", "", "str", required=True, default="")
    model = f.get(root, "model", "", "str", default="new")
    profile = f.get(root, "profile", "", "str", default="tiny")
    seed = f.get(root, "seed", "", "int", default=0, minimum=0)
    source = f.get(root, "data", "", "str", default="procedural")
    stages = []
    for i, item in enumerate(f.get(root, "stages", "", "list", required=True, default=[])):
        prefix = f"stages[{i}]"
        m = f.mapping(item, f.line_of(root, "stages"), prefix)
        if m is None:
            continue
        f.unknown_keys(m, {"stage", "steps", "lr", "weight_decay", "clip_grad", "trainable", "groups",
                           "checkpoint_every", "frames", "pool", "batch", "anchor", "anchor_weight", "lr_decay", "window",
                           "text_encoder", "detail_weight"}, prefix)
        groups = f.get(m, "groups", prefix, "list", default=list(GROUPS[:4]))
        for g in groups:
            if g not in GROUPS:
                f.add(f.line_of(m, "groups"), f"{prefix}.groups", f"expected groups from {', '.join(GROUPS)}, found {g!r}")
        frames = f.get(m, "frames", prefix, "int", default=9, minimum=1)
        if (frames - 1) % 4:
            f.add(f.line_of(m, "frames"), f"{prefix}.frames", f"expected 1 + 4k frames (the VAE's time stride), found {frames}")
        stages.append(StageConfig(
            stage=f.get(m, "stage", prefix, "str", required=True, default="transformer", choices=list(STAGES)),
            steps=f.get(m, "steps", prefix, "int", required=True, default=1, minimum=1),
            lr=f.get(m, "lr", prefix, "float", default=1e-5, exclusive_minimum=0.0),
            weight_decay=f.get(m, "weight_decay", prefix, "float", default=0.0, minimum=0.0),
            clip_grad=f.get(m, "clip_grad", prefix, "float", default=1.0, exclusive_minimum=0.0),
            trainable=f.get(m, "trainable", prefix, "str", default="all", choices=list(TRAINABLE)),
            groups=tuple(groups), checkpoint_every=f.get(m, "checkpoint_every", prefix, "int", default=50, minimum=1),
            frames=frames, pool=f.get(m, "pool", prefix, "int", default=64, minimum=1),
            batch=f.get(m, "batch", prefix, "int", default=1, minimum=1),
            anchor=f.get(m, "anchor", prefix, "int", default=0, minimum=0),
            anchor_weight=f.get(m, "anchor_weight", prefix, "float", default=0.0, minimum=0.0),
            lr_decay=f.get(m, "lr_decay", prefix, "str", default="none", choices=list(LR_DECAY)),
            window=f.get(m, "window", prefix, "int", default=0, minimum=0),
            text_encoder=f.get(m, "text_encoder", prefix, "bool", default=False),
            detail_weight=f.get(m, "detail_weight", prefix, "float", default=0.0, minimum=0.0),
        ))
        latents = 1 + (frames - 1) // 4
        if stages[-1].window > latents:
            f.add(f.line_of(m, "window"), f"{prefix}.window",
                  f"expected at most the {latents} latents of a {frames}-frame clip, found {stages[-1].window}")
        if stages[-1].window and stages[-1].anchor:
            f.add(f.line_of(m, "window"), f"{prefix}.window", "expected no anchored steps (anchor) in a windowed stage",
                  "train the anchored steps in a stage of their own before it")
    if problems:
        raise InputError(problems)
    base = Path(path).parent
    out_path = Path(out).expanduser()
    return TrainConfig(path=Path(path), out=out_path if out_path.is_absolute() else base / out_path, model=model,
                       profile=profile, data_source=source, seed=seed, stages=tuple(stages))


# --------------------------------------------------------------------------------------------
# Data


class Clip(NamedTuple):
    frames: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    first: int  # its first frame's index in the video; 0: the clip starts the video, as a shot starts


class ClipSource:
    """Clips of `frames` frames at the profile's size with their captions, clip i fixed by (seed, i)."""

    def __init__(self, source: str, width: int, height: int, seed: int, relative_to: Path):
        self.width, self.height, self.seed = width, height, seed
        self.folder = None
        if source != "procedural":
            folder = Path(source).expanduser()
            self.folder = folder if folder.is_absolute() else relative_to / folder
            self.videos = sorted(p for p in self.folder.glob("*.mp4") if p.with_suffix(".txt").is_file())
            if not self.videos:
                raise InputError(Problem(str(self.folder), None, "data",
                                         "expected videos (*.mp4) with captions beside them (*.txt of the same name)"))

    def clip(self, index: int, frames: int) -> Clip:
        from mmpl_cli import procedural

        rng = random.Random(self.seed * 1_000_003 + index)
        if self.folder is None:
            scene = procedural.scene_from_seed(rng.randrange(1 << 30))
            first = rng.randrange(0, 3) * 76  # later windows too: the shape after a bounce
            return Clip(procedural.render_scene(scene, frames, self.width, self.height, first), scene.caption(), first)
        from PIL import Image

        from mmpl_cli.video import read_frames

        video = self.videos[rng.randrange(len(self.videos))]
        pixels = read_frames(video)
        first = rng.randrange(0, max(1, len(pixels) - frames + 1))
        pixels = pixels[first:first + frames]
        if len(pixels) < frames:  # short videos repeat their last frame
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], frames - len(pixels), axis=0)])
        if pixels.shape[1:3] != (self.height, self.width):
            pixels = np.stack([np.asarray(Image.fromarray(p).resize((self.width, self.height), Image.Resampling.BICUBIC))
                               for p in pixels])
        return Clip(pixels, video.with_suffix(".txt").read_text().strip(), first)


def to_model_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)


# --------------------------------------------------------------------------------------------
# What trains


def trainable_names(names: list[str], subset: str) -> list[str]:
    """Table 3's parameter subsets of a Wan transformer: everything, self-attention only, or its q/k."""
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
    order = ["initial", "plan", "populate_stage_one", "populate_stage_two"]
    context = [(layout.group(k).targets, layout.group(k).sees) for k in order[:order.index(kind)]]
    group = layout.group(kind)
    return group.targets, group.sees, context


def progressive_window(latents: int, levels: int, chunk: int, rng: random.Random,
                       shot_start: bool) -> tuple[int, list[float]]:
    """(first latent, level in [0, 1] of every latent) of one progressive training window (seeds/004
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
# Checkpoints


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class StageRun:
    """One stage's folder: checkpoint.pt (trainable parameters, optimizer, step) and progress.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = folder / "checkpoint.pt"
        self.progress = folder / "progress.json"

    def done(self) -> bool:
        return self.progress.is_file() and json.loads(self.progress.read_text()).get("finished", False)

    def load(self, params: dict[str, torch.nn.Parameter], optimizer) -> tuple[int, list[float]]:
        if not self.checkpoint.is_file():
            return 0, []
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["losses"])

    def save(self, params: dict[str, torch.nn.Parameter], optimizer, step: int, losses: list[float],
             finished: bool = False) -> None:
        _save_atomic({"params": {n: p.detach().cpu() for n, p in params.items()}, "optimizer": optimizer.state_dict(),
                      "step": step, "losses": losses}, self.checkpoint)
        recent = losses[-50:]
        _write_json(self.progress, {"step": step, "finished": finished, "loss_recent": sum(recent) / max(1, len(recent)),
                                    "loss_first": losses[:10]})


# --------------------------------------------------------------------------------------------
# The loop


Report = Callable[[str, int, int, float, float], None]  # stage name, step, steps, loss, steps per second


def _loop(run: StageRun, params: dict[str, torch.nn.Parameter], cfg: StageConfig, step_loss: Callable[[int], torch.Tensor],
          deadline: float | None, report: Report, message: Callable[[str], None], name: str) -> bool:
    """Train until cfg.steps or the deadline; True when the stage finished."""
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, losses = run.load(params, optimizer)
    if step:
        message(f"{name}: resuming from step {step} of {cfg.steps} ({run.checkpoint})")
    started, first = time.perf_counter(), step
    while step < cfg.steps:
        if deadline is not None and time.time() >= deadline:
            run.save(params, optimizer, step, losses)
            message(f"{name}: --max-minutes reached at step {step}; run the same command to go on")
            return False
        for group in optimizer.param_groups:  # a function of the step alone, so resuming needs no scheduler state
            group["lr"] = learning_rate(cfg, step)
        loss = step_loss(step)
        if not torch.isfinite(loss):
            raise MMPLError(f"{name}: the loss became {loss.item()} at step {step}; lower lr (now {cfg.lr:g})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        report(name, step, cfg.steps, losses[-1], (step - first) / max(1e-9, time.perf_counter() - started))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save(params, optimizer, step, losses, finished=step == cfg.steps)
    return True


def learning_rate(cfg: StageConfig, step: int) -> float:
    if cfg.lr_decay == "cosine":
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))
    return cfg.lr


def _seeded(seed: int, stage: int, step: int) -> tuple[random.Random, torch.Generator]:
    key = (seed * 1_000_003 + stage) * 1_000_003 + step
    return random.Random(key), torch.Generator().manual_seed(key % (1 << 63))


def train(config: TrainConfig, report: Report, message: Callable[[str], None], max_minutes: float | None = None) -> Path:
    """Run every stage of the config in order, resuming where a previous run stopped; returns the model folder."""
    from mmpl_cli.profiles import load_profile

    profile = load_profile(config.profile, relative_to=config.path.parent)
    deadline = time.time() + 60 * max_minutes if max_minutes is not None else None
    config.out.mkdir(parents=True, exist_ok=True)
    model_dir = _initial_model(config, profile, message)
    source = ClipSource(config.data_source, profile.width, profile.height, config.seed, config.path.parent)
    for index, cfg in enumerate(config.stages):
        name = f"stage {index + 1}/{len(config.stages)} ({cfg.stage})"
        run = StageRun(config.out / f"stage{index + 1}-{cfg.stage}")
        if run.done():
            message(f"{name}: finished earlier")
            continue
        trainer = _train_vae if cfg.stage == "vae" else _train_transformer
        if not trainer(model_dir, profile, source, cfg, run, config.seed, index, deadline, report, message, name):
            return model_dir
    message(f"model: {model_dir}")
    return model_dir


def _initial_model(config: TrainConfig, profile, message) -> Path:
    """out/model: a copy of the starting folder (or a new tiny model) that the stages update in place."""
    model_dir = config.out / "model"
    if (model_dir / "transformer" / "config.json").is_file():
        return model_dir
    tmp = config.out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if config.model == "new":
        from mmpl_cli.procedural import vocabulary
        from mmpl_cli.tiny import build_tiny_model

        build_tiny_model(tmp, seed=config.seed, vocabulary=vocabulary())
        message(f"new tiny model (word-level tokenizer, {len(vocabulary())} words) in {model_dir}")
    else:
        if config.model == "profile" or config.model.startswith("builtin:"):
            source = profile.resolve_model_path(None if config.model == "profile" else config.model)
        else:
            source = Path(config.model).expanduser()
            source = source if source.is_absolute() else config.path.parent / source
        if not (source / "transformer" / "config.json").is_file():
            raise InputError(Problem(str(config.path), None, "model",
                                     f"expected a Diffusers-format Wan folder, 'new' or 'profile', found {source}"))
        shutil.copytree(source, tmp)
        message(f"starting from {source}")
    os.replace(tmp, model_dir)
    return model_dir


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
        pad = torch.zeros(b, z_dim - 5 * c, k, h, w, dtype=pixels.dtype)
        parts.append(torch.cat([1.5 * cell, 3.0 * quarter, pad], 1))
    mix, _ = torch.linalg.qr(torch.randn(z_dim, z_dim, generator=torch.Generator().manual_seed(0)))
    return torch.einsum("dc,bcthw->bdthw", 2.5 * mix, torch.cat(parts, 2))


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

    Why: the procedural shapes cover 2-6% of a frame, and a tiny VAE trained on the plain L1 learns
    the backgrounds and blurs the shapes away (gone from the later latents of a window entirely), so
    no denoiser trained on its latents can draw them."""
    error = (out - pixels).abs()
    if not detail_weight:
        return error.mean()
    median = pixels.flatten(3).median(dim=3).values[..., None, None]
    away = ((pixels - median).abs() > 0.1).any(dim=1, keepdim=True)
    weight = 1.0 + detail_weight * away.to(pixels.dtype)
    return (weight * error).mean() / weight.mean()


def _train_vae(model_dir, profile, source, cfg, run, seed, index, deadline, report, message, name) -> bool:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32, use_safetensors=True)
    vae.train()
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

    def step_loss(step: int) -> torch.Tensor:
        rng, _ = _seeded(seed, index, step)
        x = torch.stack([to_model_pixels(source.clip(rng.randrange(1 << 30), cfg.frames)[0]) for _ in range(cfg.batch)])
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

    finished = _loop(run, params, cfg, step_loss, deadline, report, message, name)
    if finished:
        vae.eval()
        _set_latent_statistics(vae, source, cfg.frames, message, name)
        vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    return finished


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


def _train_transformer(model_dir, profile, source, cfg, run, seed, index, deadline, report, message, name) -> bool:
    from mmpl_cli.plan import PROGRESSIVE_CHUNK, progressive_levels
    from mmpl_cli.sampling import flow_sigma
    from mmpl_cli.wan import ContextGroup, WanBackend

    backend = WanBackend.from_folder(model_dir, dtype="float32", max_sequence_length=profile.max_sequence_length)
    layout, shift = profile.layout, profile.sampler.shift
    latents_pool, captions, firsts = _latent_pool(backend, source, profile, cfg, run, message, name)
    everything = list(range(len(captions)))
    starts = [i for i in everything if firsts[i] == 0] or everything
    model = backend.transformer
    model.train()
    names = trainable_names([n for n, _ in model.named_parameters()], cfg.trainable)
    params = dict(model.named_parameters())
    params = {n: params[n] for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    text_encoder = backend.pipe.text_encoder
    text_encoder.requires_grad_(cfg.text_encoder)
    if cfg.text_encoder:
        text_encoder.train()
        params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()})
    message(f"{name}: {sum(p.numel() for p in params.values()):,} trainable parameters ({cfg.trainable}"
            f"{', and the text encoder' if cfg.text_encoder else ''}), groups {', '.join(cfg.groups)}")

    def encode(prompts: list[str]) -> torch.Tensor:
        """[B, tokens, dim]: a trained text encoder encodes every caption anew, a frozen one each
        caption once (cached, no gradient)."""
        if cfg.text_encoder:
            return backend.prompt_embeds(prompts)
        return torch.cat([backend.encode_text(p) for p in prompts])

    levels = progressive_levels(layout.latents, profile.sampler.steps)

    def progressive_loss(latents: torch.Tensor, text: torch.Tensor, shot_start: bool, rng: random.Random,
                         gen: torch.Generator):
        start, level = progressive_window(layout.latents, levels, PROGRESSIVE_CHUNK, rng, shot_start)
        sigma = torch.tensor([flow_sigma(v, shift) for v in level])
        clean = latents[:, :, start:start + len(level)]
        noise = torch.randn(clean.shape, generator=gen)
        noisy = (1 - sigma)[:, None, None] * clean + sigma[:, None, None] * noise
        prediction = backend._forward(noisy, range(len(level)), 0.0, text, frame_timesteps=sigma * 1000.0)
        noisy_frames = sigma > 0  # the clean chunk in front is input only
        return torch.nn.functional.mse_loss(prediction[:, :, noisy_frames], (noise - clean)[:, :, noisy_frames])

    def step_loss(step: int) -> torch.Tensor:
        """One group for the whole batch, so the batch runs as one tensor (on a 2-core CPU, about 1.5 times
        the samples per second of one sample at a time). A group that begins a shot (initial, full,
        progressive's start-up windows) learns only from clips that begin their video: the caption's
        direction is the shape's there, while a later window may show it after a bounce."""
        rng, gen = _seeded(seed, index, step)
        kind = cfg.groups[rng.randrange(len(cfg.groups))]
        shot_start = kind in ("initial", "full") or (kind == "progressive" and rng.random() < PROGRESSIVE_START)
        choices = starts if shot_start else everything
        clips = [choices[rng.randrange(len(choices))] for _ in range(cfg.batch)]
        latents = torch.stack([latents_pool[i] for i in clips])  # [B, C, F, H, W]
        text = encode(["" if rng.random() < CFG_DROPOUT else captions[i] for i in clips])
        if kind == "progressive":
            return progressive_loss(latents, text, shot_start, rng, gen)
        targets, sees, context = group_for(kind, layout, rng)
        sigma = torch.tensor([flow_sigma(rng.random(), shift) for _ in clips])[:, None, None, None, None]
        clean = latents[:, :, list(targets)]
        noise = torch.randn(clean.shape, generator=gen)
        noisy = (1 - sigma) * clean + sigma * noise
        groups = [ContextGroup(latents[:, :, list(frames)], frames, group_sees) for frames, group_sees in context]
        evaluate = backend._recomputing_evaluator(targets, sees, groups, [text])
        prediction = evaluate(noisy, sigma.flatten() * 1000.0, 0)
        return torch.nn.functional.mse_loss(prediction, noise - clean)

    finished = _loop(run, params, cfg, step_loss, deadline, report, message, name)
    if finished:
        model.eval()
        model.save_pretrained(model_dir / "transformer", safe_serialization=True)
        if cfg.text_encoder:
            text_encoder.eval()
            text_encoder.save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    return finished


def _latent_pool(backend, source: ClipSource, profile, cfg: StageConfig, run: StageRun, message, name):
    """`cfg.pool` clips of one segment window, VAE-encoded once (kept in the stage folder for resumes):
    (latents, captions, each clip's first frame in its video)."""
    from safetensors.torch import load_file

    path = run.folder / "pool.safetensors"
    about_path = run.folder / "pool.json"
    if path.is_file() and about_path.is_file():
        tensors, about = load_file(path), json.loads(about_path.read_text())
        # older pools listed captions only: where their clips begin is unknown
        about = [a if isinstance(a, dict) else {"caption": a, "first": None} for a in about]
        latents = [tensors[str(i)] for i in range(len(about))]
    else:
        latents, about = _encode_pool(backend, source, profile, cfg, path, about_path, message, name)
    return latents, [a["caption"] for a in about], [a["first"] for a in about]


def _encode_pool(backend, source: ClipSource, profile, cfg: StageConfig, path: Path, about_path: Path, message, name):
    """Encode the pool 8 clips at a time and write it atomically: (latents, [{caption, first}])."""
    from safetensors.torch import save_file

    message(f"{name}: encoding {cfg.pool} clips of {profile.segment_frames} frames with the VAE")
    latents, about = [], []
    every = max(POOL_BATCH, cfg.pool // 8)  # a progress line about every eighth of the pool
    for batch in range(0, cfg.pool, POOL_BATCH):
        clips = [source.clip(10_000_000 + i, profile.segment_frames) for i in range(batch, min(cfg.pool, batch + POOL_BATCH))]
        latents.extend(backend.encode(torch.stack([to_model_pixels(c.frames) for c in clips])))
        about.extend({"caption": c.caption, "first": c.first} for c in clips)
        if len(latents) == cfg.pool or len(latents) // every > batch // every:
            message(f"{name}: encoded {len(latents)}/{cfg.pool} clips")
    tmp = path.with_name("pool.tmp.safetensors")
    save_file({str(i): z.contiguous() for i, z in enumerate(latents)}, tmp)
    os.replace(tmp, path)
    _write_json(about_path, about)
    return latents, about

