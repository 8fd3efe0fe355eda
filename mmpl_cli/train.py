"""`mmpl train CONFIG.yaml`: how training runs. The config, the stages in order, and the loop that
steps, checkpoints and resumes each one; what a step computes (data, groups, losses) is recipe.py's.

A config runs one or more stages in order (`vae` trains the autoencoder on clips, `transformer`
the denoiser), with AdamW and gradient clipping; each stage checkpoints atomically every
`checkpoint_every` steps and a rerun of the same command resumes from the last checkpoint. Every
step's data and noise come from (seed, step), and its learning rate from the step alone, so a
resumed run ends with exactly the weights of an uninterrupted one.

Through accelerate, one process per device (`accelerate launch -m mmpl_cli train CONFIG`, or
torchrun): a stage's `batch` is the global batch, every process draws the whole step's data and
takes its own rows of it (batch / (processes x accumulation) per micro-step), and accelerate's
data-parallel wrapper averages the gradients, so the weights do not depend on the process count
beyond float rounding. The main process writes the model, checkpoints and progress; the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.files import MAX_RECORD_BYTES, atomic_path, check_output, disk_errors, load_json, write_atomic
from mmpl_cli.dataset import ClipSource
from mmpl_cli.recipe import Setup, transformer_stage, vae_stage
from mmpl_cli.train_config import DEVICES, StageConfig, TrainConfig, load_train_config

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


def _loop(run: StageRun, stage, cfg: StageConfig, acc, deadline: float | None, report: Report,
          message: Callable[[str], None], name: str) -> bool:
    """Train until cfg.steps or the deadline; True when the stage finished. Every decision that ends
    the loop (deadline, a loss that is not finite) is taken by all processes together."""
    params = list(stage.params.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, losses = run.load(stage.params, optimizer)
    optimizer = acc.prepare_optimizer(optimizer, device_placement=False)  # fp16's loss scaling, when asked for
    if step:
        message(f"{name}: resuming from step {step} of {cfg.steps} ({run.checkpoint})")
    rows = cfg.batch // (acc.num_processes * cfg.accumulation)
    started, first = time.perf_counter(), step
    while step < cfg.steps:
        if deadline is not None and _any(acc, time.time() >= deadline):
            _save(acc, run, stage.params, optimizer, step, losses)
            message(f"{name}: --max-minutes reached at step {step}; run the same command to go on")
            return False
        for group in optimizer.param_groups:  # a function of the step alone, so resuming needs no scheduler state
            group["lr"] = learning_rate(cfg, step)
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.accumulation):
            start = (acc.process_index * cfg.accumulation + micro) * rows
            last = micro == cfg.accumulation - 1
            with contextlib.nullcontext() if last or stage.module is None else acc.no_sync(stage.module):
                loss = stage.step_loss(step, slice(start, start + rows)) / cfg.accumulation
                acc.backward(loss)
            total += loss.detach()
        if acc.num_processes > 1 and stage.replicated:  # gradients outside accelerate's wrapper
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stage.replicated]
            for p, g in zip(stage.replicated, acc.reduce(grads, reduction="mean")):
                p.grad = g
        loss = float(acc.reduce(total, reduction="mean"))
        if not math.isfinite(loss):
            raise MMPLError(f"{name}: the loss became {loss} at step {step}; lower lr (now {cfg.lr:g})")
        acc.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        step += 1
        report(name, step, cfg.steps, losses[-1], (step - first) / max(1e-9, time.perf_counter() - started))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(acc, run, stage.params, optimizer, step, losses, finished=step == cfg.steps)
    return True


def _any(acc, flag: bool) -> bool:
    """True on every process when it is true on one."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum") > 0)


def _save(acc, run: StageRun, params, optimizer, step: int, losses: list[float], finished: bool = False) -> None:
    if acc.is_main_process:
        run.save(params, optimizer, step, losses, finished)
    acc.wait_for_everyone()


def learning_rate(cfg: StageConfig, step: int) -> float:
    if cfg.lr_decay == "cosine":
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))
    return cfg.lr


def accelerator(config: TrainConfig, device: str | None = None):
    """accelerate's Accelerator for this process: CUDA when there is one (device auto), else the CPU
    (gloo between processes), with the config's mixed precision."""
    from accelerate import Accelerator

    device = device or config.device
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise InputError(Problem(str(config.path), None, "device", "expected a visible CUDA device, found none",
                                 "use device: cpu (or auto)"))
    on_cpu = device == "cpu" or not cuda
    if on_cpu and config.mixed_precision == "fp16":
        raise InputError(Problem(str(config.path), None, "mixed_precision", "expected bf16 or no on the CPU, found fp16",
                                 "fp16 training (loss scaling) needs a GPU"))
    return Accelerator(cpu=on_cpu, mixed_precision=config.mixed_precision)


def train(config: TrainConfig, report: Report, message: Callable[[str], None], max_minutes: float | None = None,
          device: str | None = None, prepare: bool = False) -> Path:
    """Run every stage of the config in order, resuming where a previous run stopped; returns the
    model folder. With `prepare`, encode the transformer stages' pool (latents and caption
    embeddings) into the cache folder instead, and stop."""
    from mmpl_cli.profiles import load_profile

    # everything the config names is checked before the first byte is written
    profile = load_profile(config.profile, relative_to=config.path.parent)
    source = ClipSource(config.data_source, profile.width, profile.height, config.seed, config.path.parent, profile.fps)
    check_output(config.out, "out", folder=True)
    acc = accelerator(config, device)
    if not acc.is_main_process:
        report, message = (lambda *a: None), (lambda *a: None)
    from mmpl_cli.train_memory import check_fits

    check_fits(config, profile, _model_path(config, profile), acc, message)  # before any weights are looked for
    for index, cfg in enumerate(config.stages):
        if cfg.batch % (acc.num_processes * cfg.accumulation):
            raise InputError(Problem(str(config.path), None, f"stages[{index}].batch",
                                     f"expected a multiple of {acc.num_processes} processes x {cfg.accumulation} "
                                     f"accumulation, found {cfg.batch}"))
    start = _model_source(config, profile)
    deadline = time.time() + 60 * max_minutes if max_minutes is not None else None
    if config.sharding == "full" and not prepare:
        raise InputError(Problem(str(config.path), None, "sharding",
                                 "expected none: this version estimates a full shard (--estimate) but does not run one",
                                 "train with sharding: none (data parallel), or plan with --estimate"))
    if acc.is_main_process:
        with disk_errors(config.out):
            config.out.mkdir(parents=True, exist_ok=True)
        _initial_model(config, start, message)
    acc.wait_for_everyone()
    model_dir = config.out / "model"
    message(f"{acc.num_processes} process(es) on {acc.device.type}, mixed precision {config.mixed_precision}"
            f"{', checkpointed activations' if config.gradient_checkpointing else ''}")
    if prepare:
        from mmpl_cli.prepare import prepare_pool

        return prepare_pool(config, profile, source, model_dir, acc, message)
    prepared = config.is_prepared
    for index, cfg in enumerate(config.stages):
        name = f"stage {index + 1}/{len(config.stages)} ({cfg.stage})"
        run = StageRun(config.stage_folder(index))
        if run.done():
            message(f"{name}: finished earlier")
            continue
        message(f"{name}: global batch {cfg.batch} = {cfg.batch // (acc.num_processes * cfg.accumulation)} per process "
                f"x {acc.num_processes} process(es) x {cfg.accumulation} accumulation step(s)")
        stage_prepared = prepared and cfg.stage == "transformer"
        if stage_prepared:
            from mmpl_cli.prepare import check_prepared

            check_prepared(config, profile, source, model_dir)
        setup = Setup(device=str(acc.device), rank=acc.process_index, processes=acc.num_processes,
                      prepare=acc.prepare_model, wait=acc.wait_for_everyone, checkpointing=config.gradient_checkpointing,
                      pool=config.prepared if stage_prepared else run.folder / "pool", prepared=stage_prepared,
                      message=message, name=name)
        build = vae_stage if cfg.stage == "vae" else transformer_stage
        stage = build(model_dir, profile, source, cfg, setup, config.seed, index)
        if not _loop(run, stage, cfg, acc, deadline, report, message, name):
            return model_dir
        if acc.is_main_process:
            stage.finish()
        acc.wait_for_everyone()
    message(f"model: {model_dir}")
    return model_dir


def command(path: Path, progress_class, max_minutes: float | None, device: str | None, prepare: bool,
            estimate: int | None, memory_gb: float | None) -> str | None:
    """`mmpl train`: what the command line asks, run; what to print at the end (None: nothing)."""
    config = load_train_config(path)
    if device is not None and device not in DEVICES:
        raise InputError(Problem("--device", None, "--device", f"expected one of {', '.join(DEVICES)}, found {device!r}"))
    if memory_gb is not None:
        config = dataclasses.replace(config, memory_gb=memory_gb)
    if estimate is not None:
        from mmpl_cli.profiles import load_profile
        from mmpl_cli.train_memory import estimates

        profile = load_profile(config.profile, relative_to=config.path.parent)
        estimates(config, profile, _model_path(config, profile), estimate, config.memory_gb, print)
        return None
    main = os.environ.get("RANK", "0") == "0"  # a launcher's other processes stay quiet
    progress = progress_class(quiet=not main)
    try:
        folder = train(config, progress.report, progress.message, max_minutes, device, prepare)
    finally:
        progress.close()
    return (f"prepared data: {folder}" if prepare else f"model folder: {folder}") if main else None


def _model_path(config: TrainConfig, profile) -> Path | None:
    """The Diffusers folder training starts from, as the config names it; None for a new tiny model."""
    if config.model == "new":
        return None
    if config.model == "profile" or config.model.startswith("builtin:"):
        return profile.resolve_model_path(None if config.model == "profile" else config.model)
    source = Path(config.model).expanduser()
    return source if source.is_absolute() else config.path.parent / source


def _model_source(config: TrainConfig, profile) -> Path | None:
    """The Diffusers folder training starts from, checked; None for a new tiny model."""
    source = _model_path(config, profile)
    if source is None:
        return None
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
