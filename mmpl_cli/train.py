"""`mmpl train CONFIG.yaml`: how training runs. The config, the stages in order, and the loop that
steps, checkpoints and resumes each one; what a step computes (data, groups, losses) is recipe.py's.

A config runs one or more stages in order (`vae` trains the autoencoder on clips, `transformer`
the denoiser), with AdamW and gradient clipping; each stage checkpoints atomically every
`checkpoint_every` steps and a rerun of the same command resumes from the last checkpoint. Every
step's data and noise come from (seed, step), and its learning rate from the step alone, so a
resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.files import MAX_RECORD_BYTES, atomic_path, check_output, disk_errors, load_json, write_atomic
from mmpl_cli.layout import MAX_LATENTS
from mmpl_cli.recipe import TRAIN_GROUPS, TRAINABLE, ClipSource, transformer_stage, vae_stage
from mmpl_cli.yamlio import Fields, Located, load_yaml

STAGES = ("vae", "transformer")
LR_DECAY = ("none", "cosine")


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
        groups = f.get(m, "groups", prefix, "list", default=list(TRAIN_GROUPS[:4]))
        for g in groups:
            if g not in TRAIN_GROUPS:
                f.add(f.line_of(m, "groups"), f"{prefix}.groups", f"expected groups from {', '.join(TRAIN_GROUPS)}, found {g!r}")
        frames = f.get(m, "frames", prefix, "int", default=9, minimum=1, maximum=1 + 4 * MAX_LATENTS)
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
            frames=frames, pool=f.get(m, "pool", prefix, "int", default=64, minimum=1, maximum=1_000_000),
            batch=f.get(m, "batch", prefix, "int", default=1, minimum=1, maximum=4096),
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
# Checkpoints


class StageRun:
    """One stage's folder: checkpoint.pt (trainable parameters, optimizer, step) and progress.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = folder / "checkpoint.pt"
        self.progress = folder / "progress.json"

    def done(self) -> bool:
        try:
            progress = load_json(self.progress, MAX_RECORD_BYTES)
        except (OSError, ValueError):
            return False  # missing or damaged: the checkpoint says where the stage stands
        return isinstance(progress, dict) and progress.get("finished") is True

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
        state = {"params": {n: p.detach().cpu() for n, p in params.items()}, "optimizer": optimizer.state_dict(),
                 "step": step, "losses": losses}
        # through a file object: torch names the archive inside after a path's file name, which for
        # the temporary name would differ from run to run
        with atomic_path(self.checkpoint) as tmp, open(tmp, "wb") as fh:
            torch.save(state, fh)
        recent = losses[-50:]
        write_atomic(self.progress, json.dumps({"step": step, "finished": finished,
                                                "loss_recent": sum(recent) / max(1, len(recent)),
                                                "loss_first": losses[:10]}, indent=2) + "\n")


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


def train(config: TrainConfig, report: Report, message: Callable[[str], None], max_minutes: float | None = None) -> Path:
    """Run every stage of the config in order, resuming where a previous run stopped; returns the model folder."""
    from mmpl_cli.profiles import load_profile

    # everything the config names is checked before the first byte is written
    profile = load_profile(config.profile, relative_to=config.path.parent)
    source = ClipSource(config.data_source, profile.width, profile.height, config.seed, config.path.parent)
    check_output(config.out, "out", folder=True)
    start = _model_source(config, profile)
    deadline = time.time() + 60 * max_minutes if max_minutes is not None else None
    with disk_errors(config.out):
        config.out.mkdir(parents=True, exist_ok=True)
    model_dir = _initial_model(config, start, message)
    for index, cfg in enumerate(config.stages):
        name = f"stage {index + 1}/{len(config.stages)} ({cfg.stage})"
        run = StageRun(config.out / f"stage{index + 1}-{cfg.stage}")
        if run.done():
            message(f"{name}: finished earlier")
            continue
        build = vae_stage if cfg.stage == "vae" else transformer_stage
        stage = build(model_dir, profile, source, cfg, run.folder, config.seed, index, message, name)
        if not _loop(run, stage.params, cfg, stage.step_loss, deadline, report, message, name):
            return model_dir
        stage.finish()
    message(f"model: {model_dir}")
    return model_dir


def _model_source(config: TrainConfig, profile) -> Path | None:
    """The Diffusers folder training starts from, checked; None for a new tiny model."""
    if config.model == "new":
        return None
    if config.model == "profile" or config.model.startswith("builtin:"):
        source = profile.resolve_model_path(None if config.model == "profile" else config.model)
    else:
        source = Path(config.model).expanduser()
        source = source if source.is_absolute() else config.path.parent / source
    if not (source / "transformer" / "config.json").is_file():
        raise InputError(Problem(str(config.path), None, "model",
                                 f"expected a Diffusers-format Wan folder, 'new' or 'profile', found {source}"))
    return source


def _initial_model(config: TrainConfig, source: Path | None, message) -> Path:
    """out/model: a copy of the starting folder (or a new tiny model) that the stages update in place."""
    model_dir = config.out / "model"
    if (model_dir / "transformer" / "config.json").is_file():
        return model_dir
    tmp = config.out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if source is None:
        from mmpl_cli.procedural import vocabulary
        from mmpl_cli.tiny import build_tiny_model

        build_tiny_model(tmp, seed=config.seed, vocabulary=vocabulary())
        message(f"new tiny model (word-level tokenizer, {len(vocabulary())} words) in {model_dir}")
    else:
        shutil.copytree(source, tmp)
        message(f"starting from {source}")
    os.replace(tmp, model_dir)
    return model_dir
