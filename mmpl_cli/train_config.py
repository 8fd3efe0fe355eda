"""A training config (`mmpl train CONFIG.yaml`): read, checked, every problem reported at once with
its line (exit 2, nothing written). See examples/train-tiny.yaml and examples/train-wan14b.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.layout import MAX_LATENTS
from mmpl_cli.recipe import TRAIN_GROUPS, TRAINABLE
from mmpl_cli.yamlio import Fields, Located, load_yaml

STAGES = ("vae", "transformer")
LR_DECAY = ("none", "cosine")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("no", "bf16", "fp16")


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
    accumulation: int = 1  # micro-steps per step: each process runs batch / (processes x accumulation) clips at once


@dataclass(frozen=True)
class TrainConfig:
    path: Path
    out: Path
    model: str  # a Diffusers-format folder, builtin:tiny, or "new" (the tiny architecture, word tokenizer)
    profile: str
    data_source: str  # "procedural" or a folder of clip.mp4 + clip.txt
    seed: int
    stages: tuple[StageConfig, ...]
    cache: Path | None = None  # where `--prepare` puts latents and caption embeddings (None: <out>/prepared)
    device: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    sharding: str = "none"  # "full": the estimate's FSDP full shard (not run by this version)
    memory_gb: float | None = None  # device memory per process for the estimate's check (None: the GPU's own)

    @property
    def prepared(self) -> Path:
        return self.cache or self.out / "prepared"

    @property
    def is_prepared(self) -> bool:
        """`--prepare` has begun the cache (its record is written first)."""
        return (self.prepared / "pool.json").is_file()

    def stage_folder(self, index: int) -> Path:
        return self.out / f"stage{index + 1}-{self.stages[index].stage}"


def load_train_config(path: Path) -> TrainConfig:
    data = load_yaml(path, "training config")
    problems: list[Problem] = []
    f = Fields(str(path), problems)
    root = f.mapping(data, getattr(data, "line", 1), "") or Located()
    f.unknown_keys(root, {"version", "out", "model", "profile", "data", "seed", "stages", "device", "mixed_precision",
                          "gradient_checkpointing", "sharding", "memory_gb"}, "")
    version = f.get(root, "version", "", "int", required=True, default=1)
    if version != 1:
        f.add(f.line_of(root, "version"), "version", f"expected 1, found {version}")
    out = f.get(root, "out", "", "str", required=True, default="")
    model = f.get(root, "model", "", "str", default="new")
    profile = f.get(root, "profile", "", "str", default="tiny")
    seed = f.get(root, "seed", "", "int", default=0, minimum=0)
    source, cache = _data(f, root)
    stages = []
    for i, item in enumerate(f.get(root, "stages", "", "list", required=True, default=[])):
        prefix = f"stages[{i}]"
        m = f.mapping(item, f.line_of(root, "stages"), prefix)
        if m is None:
            continue
        f.unknown_keys(m, {"stage", "steps", "lr", "weight_decay", "clip_grad", "trainable", "groups",
                           "checkpoint_every", "frames", "pool", "batch", "anchor", "anchor_weight", "lr_decay", "window",
                           "text_encoder", "detail_weight", "accumulation"}, prefix)
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
            accumulation=f.get(m, "accumulation", prefix, "int", default=1, minimum=1, maximum=4096),
        ))
        if stages[-1].batch % stages[-1].accumulation:
            f.add(f.line_of(m, "accumulation"), f"{prefix}.accumulation",
                  f"expected a divisor of batch ({stages[-1].batch}), found {stages[-1].accumulation}")
        latents = 1 + (frames - 1) // 4
        if stages[-1].window > latents:
            f.add(f.line_of(m, "window"), f"{prefix}.window",
                  f"expected at most the {latents} latents of a {frames}-frame clip, found {stages[-1].window}")
        if stages[-1].window and stages[-1].anchor:
            f.add(f.line_of(m, "window"), f"{prefix}.window", "expected no anchored steps (anchor) in a windowed stage",
                  "train the anchored steps in a stage of their own before it")
    device = f.get(root, "device", "", "str", default="auto", choices=list(DEVICES))
    precision = f.get(root, "mixed_precision", "", "str", default="no", choices=list(MIXED_PRECISION))
    checkpointing = f.get(root, "gradient_checkpointing", "", "bool", default=False)
    memory_gb = f.get(root, "memory_gb", "", "float", exclusive_minimum=0.0)
    sharding = f.get(root, "sharding", "", "str", default="none", choices=["none", "full"])
    if problems:
        raise InputError(problems)
    base = Path(path).parent

    def place(name: str) -> Path:
        p = Path(name).expanduser()
        return p if p.is_absolute() else base / p

    return TrainConfig(path=Path(path), out=place(out), model=model, profile=profile, data_source=source, seed=seed,
                       stages=tuple(stages), cache=place(cache) if cache else None, device=device,
                       mixed_precision=precision, gradient_checkpointing=checkpointing, sharding=sharding,
                       memory_gb=memory_gb)


def _data(f: Fields, root: Located) -> tuple[str, str | None]:
    """`data: procedural`, `data: DIR`, or `data: {folder: DIR, cache: DIR}`: (source, cache folder)."""
    value = root.get("data")
    if isinstance(value, Located):
        f.unknown_keys(value, {"folder", "cache"}, "data")
        return f.get(value, "folder", "data", "str", required=True, default="procedural"), f.get(value, "cache", "data", "str")
    return f.get(root, "data", "", "str", default="procedural"), None
