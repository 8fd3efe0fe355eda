"""Profiles: which model, at what size and frame rate, with which sampler, planning layout and costs.

A profile is data (YAML under `profiles/`), read into frozen dataclasses here. This module knows
nothing of torch: it only says where weights should be and whether the files are there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.memory import WAN_TRANSFORMERS
from mmpl_cli.layout import Layout, parse_layout
from mmpl_cli.yamlio import Fields, Located, load_yaml
from mmpl_cli.terms import DTYPES, GROUPS, SEEDINGS, STRATEGIES, Kind

BUILTIN_PREFIX = "builtin:"
# What a Diffusers-format Wan folder must hold for us to load it (diffusers' own layout).
REQUIRED_MODEL_FILES = {
    "transformer": ["config.json", "*.safetensors"],
    "vae": ["config.json", "*.safetensors"],
    "text_encoder": ["config.json", "*.safetensors"],
    "tokenizer": ["tokenizer_config.json"],
}
SCHEDULERS = ["unipc", "euler", "few-step"]  # few-step: distilled models (sampling.FewStepScheduler)
# diffusers attention backends that need nothing from the network (its *_hub backends download
# kernels); "auto" is flash-attn on a GPU in half precision when the `flash` extra is installed.
ATTENTION_BACKENDS = ["auto", "native", "flash", "flash_varlen", "_flash_3", "flex", "sage", "xformers",
                      "_native_cudnn", "_native_efficient", "_native_flash", "_native_math"]
# Backends that run only on a CUDA GPU, and the package each needs (None: part of torch).
GPU_ATTENTION = {"flash": "flash_attn", "flash_varlen": "flash_attn", "_flash_3": "flash_attn_interface",
                 "sage": "sageattention", "xformers": "xformers", "_native_cudnn": None,
                 "_native_efficient": None, "_native_flash": None}
OFFLOAD = ["auto", "never", "always"]  # text encoder and VAE on the CPU between uses
CHECKPOINT_NAMING = ["auto", "original", "diffusers"]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """A transformer checkpoint that replaces the model folder's transformer weights: an MMPL,
    Self-Forcing or CausVid `.pt` (an entry such as `generator_ema` holding the transformer in the
    original Wan naming under `model.`), or a `.safetensors` file, in either naming."""

    path: str  # as written, relative to the profile file
    path_env: str | None  # environment variable that overrides it
    key: str  # entry inside the file: "auto" takes generator, generator_ema, state_dict or model (weights.ENTRY_KEYS)
    naming: str  # auto | original | diffusers
    line: int | None  # where it is in the profile, for messages


@dataclass(frozen=True)
class Sampler:
    scheduler: str = "unipc"  # diffusers UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler
    steps: int = 50
    shift: float = 5.0  # flow-matching timestep shift
    guidance: float = 5.0  # classifier-free guidance scale; 1.0 turns CFG off
    search: int = 1  # k-step noise search (the k-step noise search paper): candidate noises per group; 1 turns it off
    search_steps: int = 2  # denoising steps each candidate runs before they are compared
    timesteps: tuple[int, ...] = ()  # few-step: the timesteps a distilled model was trained at, 1000 first

    def with_overrides(self, overrides: dict) -> "Sampler":
        return Sampler(**{**self.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # the file it was read from
    description: str
    model_path: str  # as written: "builtin:tiny", an absolute path, or relative to the profile
    model_path_env: str | None  # environment variable that overrides model_path
    dtype: str
    width: int
    height: int
    fps: int
    vae_temporal: int  # pixel frames per latent after the first (Wan's causal VAE: 4)
    vae_spatial: int  # pixels per latent side (Wan VAE: 8)
    max_sequence_length: int  # text tokens fed to the transformer
    sampler: Sampler
    layout: Layout
    noise_blend: float | None  # App. G: weight of the adjacent planning latent's noise at a populating edge; None: off
    costs: dict[str, float] = field(default_factory=dict)  # seconds per stage on the reference GPU
    memory_gb: dict[str, float] = field(default_factory=dict)  # overrides the memory model's peak per seeding mode
    checkpoint: Checkpoint | None = None  # replaces the folder's transformer weights
    attention: str = "auto"  # diffusers attention backend (ATTENTION_BACKENDS)
    offload: str = "auto"  # text encoder and VAE on the CPU between uses (OFFLOAD)
    handover: str = "planning"  # App. F: the next segment's initial latents through the VAE (HANDOVERS)
    decode: str = "after-previous"  # what the VAE decodes a later segment's frames after (DECODES)
    strategy: str = "mmpl"  # a shot's when neither it nor the shot list names one (a Self-Forcing profile: causal)
    negative_prompt: str = ""  # a shot's when it names none (Wan's profiles: Wan's standard one)
    architecture: str | None = None  # a released architecture (memory.WAN_TRANSFORMERS), for the memory model without weights

    @property
    def segment_frames(self) -> int:
        return 1 + self.vae_temporal * (self.layout.latents - 1)

    def pixel_frames(self, latents: int) -> int:
        """Pixel frames that `latents` consecutive latents from a segment start decode to."""
        return 0 if latents <= 0 else 1 + self.vae_temporal * (latents - 1)

    def _model_path_setting(self, override: str | None) -> tuple[str, str, bool]:
        """(raw path, where it came from, relative to the working directory?): --model-path, then the
        profile's environment variable, then the profile file."""
        if override:
            return override, "--model-path", True
        env = os.environ.get(self.model_path_env) if self.model_path_env else None
        if env:
            return env, f"${self.model_path_env}", True
        return self.model_path, f"model.path in {self.source}", False

    def model_path_origin(self, override: str | None = None) -> str:
        """Which setting `resolve_model_path` follows, for messages."""
        return self._model_path_setting(override)[1]

    def resolve_model_path(self, override: str | None = None) -> Path:
        """Where the weights are: --model-path, then the profile's environment variable, then the file."""
        raw, _, from_cwd = self._model_path_setting(override)
        return self._resolve(raw, from_cwd=from_cwd)

    def resolve_checkpoint(self) -> Path | None:
        """The transformer checkpoint file, if the profile names one: its environment variable first."""
        if self.checkpoint is None:
            return None
        env = os.environ.get(self.checkpoint.path_env) if self.checkpoint.path_env else None
        return self._resolve(env, from_cwd=True) if env else self._resolve(self.checkpoint.path)

    def _resolve(self, raw: str, from_cwd: bool = False) -> Path:
        """A path as written: relative to the working directory when given on the command line or in
        the environment, relative to the profile's folder when written in the profile."""
        if raw.startswith(BUILTIN_PREFIX):
            return Path(str(resources.files("mmpl_cli.assets"))) / raw[len(BUILTIN_PREFIX):]
        path = Path(os.path.expandvars(raw)).expanduser()
        if not path.is_absolute():
            path = (Path.cwd() if from_cwd else Path(self.source).parent) / path
        return path

    def missing_model_files(self, override: str | None = None) -> list[str]:
        """Relative paths that a Diffusers-format folder for this profile lacks (empty when complete)."""
        root = self.resolve_model_path(override)
        if not root.is_dir():
            return [str(root)]
        missing = []
        for sub, patterns in REQUIRED_MODEL_FILES.items():
            for pattern in patterns:
                if not list((root / sub).glob(pattern)):
                    missing.append(f"{sub}/{pattern}")
        return missing


def model_fingerprint(root: Path, checkpoint: Path | None = None, entry: str = "",
                      say: Callable[[str], None] | None = None) -> str:
    """Identifies the weights by their contents: every file's path and SHA-256 under the model
    folder, and the transformer checkpoint's name, SHA-256 and entry. Retraining a file in place
    changes it, as any other change does. Each digest is computed once per version of its file
    (files.DigestCache: an unchanged file costs a stat); `say` hears when weights are read to hash."""
    import hashlib

    from mmpl_cli.files import DigestCache

    cache = DigestCache()
    told = []

    def reading(size: int) -> None:
        if say is not None and size > 256 << 20 and not told:
            told.append(True)
            say(f"hashing the model's weights under {root} (once per version of each file)")

    digest = hashlib.sha256()
    if checkpoint is not None:
        digest.update(f"checkpoint:{checkpoint.name}:{cache.digest(checkpoint, reading)}:{entry}\n".encode())
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}:{cache.digest(path, reading)}\n".encode())
    cache.save()
    return digest.hexdigest()


def builtin_profiles_dir() -> Path:
    return Path(str(resources.files("mmpl_cli.profile_files")))


def list_profiles() -> list[str]:
    return sorted(p.stem for p in builtin_profiles_dir().glob("*.yaml"))


def find_profile(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A profile name ('tiny') names a shipped profile; anything with a slash or .yaml is a file."""
    looks_like_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        return path
    path = builtin_profiles_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        import difflib

        names = list_profiles()
        close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"known profiles: {', '.join(names)}"
        raise InputError(Problem("", None, "profile", f"unknown profile '{name_or_path}'", hint))
    return path


def load_profile(name_or_path: str, relative_to: Path | None = None) -> Profile:
    path = find_profile(name_or_path, relative_to)
    data = load_yaml(path, "profile")
    problems: list[Problem] = []
    profile = parse_profile(data, str(path), problems)
    if problems:
        raise InputError(problems)
    assert profile is not None
    return profile


def parse_profile(data, file: str, problems: list[Problem]) -> Profile | None:
    f = Fields(file, problems)
    root = f.mapping(data, getattr(data, "line", 1), "")
    if root is None:
        return None
    f.unknown_keys(root, {"name", "description", "model", "video", "sampler", "text", "layout",
                          "noise_init", "handover", "decode", "negative_prompt", "costs", "memory_gb", "strategy"}, "")
    name = f.get(root, "name", "", "str", required=True, default="?")
    description = f.get(root, "description", "", "str", default="")

    model = f.get(root, "model", "", "mapping", required=True) or Located()
    f.unknown_keys(model, {"path", "path_env", "dtype", "transformer", "attention", "offload", "architecture"}, "model")
    model_path = f.get(model, "path", "model", "str", required=True, default="")
    path_env = f.get(model, "path_env", "model", "str")
    dtype = f.get(model, "dtype", "model", "str", default="float32", choices=DTYPES)
    attention = f.get(model, "attention", "model", "str", default="auto", choices=ATTENTION_BACKENDS)
    offload = f.get(model, "offload", "model", "str", default="auto", choices=OFFLOAD)
    architecture = f.get(model, "architecture", "model", "str", choices=list(WAN_TRANSFORMERS))
    checkpoint = None
    override = f.get(model, "transformer", "model", "mapping")
    if override is not None:
        f.unknown_keys(override, {"path", "path_env", "key", "naming"}, "model.transformer")
        ckpt_path = f.get(override, "path", "model.transformer", "str", required=True, default="")
        if ckpt_path and not ckpt_path.endswith(CHECKPOINT_SUFFIXES):
            f.add(f.line_of(override, "path"), "model.transformer.path",
                  f"expected a {', '.join(CHECKPOINT_SUFFIXES)} file, found '{ckpt_path}'")
        checkpoint = Checkpoint(
            path=ckpt_path,
            path_env=f.get(override, "path_env", "model.transformer", "str"),
            key=f.get(override, "key", "model.transformer", "str", default="auto"),
            naming=f.get(override, "naming", "model.transformer", "str", default="auto", choices=CHECKPOINT_NAMING),
            line=f.line_of(override, "path"),
        )

    video = f.get(root, "video", "", "mapping", required=True) or Located()
    f.unknown_keys(video, {"width", "height", "fps", "vae_temporal", "vae_spatial"}, "video")
    vae_spatial = f.get(video, "vae_spatial", "video", "int", default=8, minimum=1, maximum=64)
    width = f.get(video, "width", "video", "int", required=True, default=16, minimum=16, maximum=MAX_SIDE)
    height = f.get(video, "height", "video", "int", required=True, default=16, minimum=16, maximum=MAX_SIDE)
    for key, value in (("width", width), ("height", height)):
        if value % (2 * vae_spatial):
            f.add(f.line_of(video, key), f"video.{key}",
                  f"expected a multiple of {2 * vae_spatial} (VAE stride x patch size), found {value}")
    fps = f.get(video, "fps", "video", "int", required=True, default=16, minimum=1, maximum=MAX_FPS)
    vae_temporal = f.get(video, "vae_temporal", "video", "int", default=4, minimum=1, maximum=16)

    sampler_map = f.get(root, "sampler", "", "mapping", required=True) or Located()
    sampler = parse_sampler(f, sampler_map, "sampler", Sampler())

    text = f.get(root, "text", "", "mapping") or Located()
    f.unknown_keys(text, {"max_sequence_length"}, "text")
    max_seq = f.get(text, "max_sequence_length", "text", "int", default=512, minimum=1, maximum=4096)

    layout = parse_layout(f, f.get(root, "layout", "", "mapping", required=True) or Located())

    noise = f.get(root, "noise_init", "", "mapping") or Located()
    f.unknown_keys(noise, {"alpha", "enabled"}, "noise_init")
    alpha = f.get(noise, "alpha", "noise_init", "float", default=0.5, minimum=0.0, maximum=1.0)
    if not f.get(noise, "enabled", "noise_init", "bool", default=True):
        alpha = None  # ablation: every populating latent starts from its own noise
    handover = f.get(root, "handover", "", "str", default="planning", choices=list(HANDOVERS))
    decode = f.get(root, "decode", "", "str", default="after-previous", choices=list(DECODES))

    costs = _number_map(f, root, "costs", [*map(str, GROUPS), "handover", str(Kind.DECODE)])
    memory = _number_map(f, root, "memory_gb", list(SEEDINGS))

    return Profile(
        name=name, source=file, description=description, model_path=model_path, model_path_env=path_env,
        dtype=dtype, width=width, height=height, fps=fps, vae_temporal=vae_temporal, vae_spatial=vae_spatial,
        max_sequence_length=max_seq, sampler=sampler, layout=layout,
        noise_blend=alpha, costs=costs, memory_gb=memory,
        checkpoint=checkpoint, attention=attention, offload=offload, handover=handover, decode=decode, architecture=architecture,
        negative_prompt=f.get(root, "negative_prompt", "", "str", default=""),
        strategy=f.get(root, "strategy", "", "str", default="mmpl", choices=list(STRATEGIES)),
    )


SAMPLER_KEYS = {"scheduler", "steps", "shift", "guidance", "search", "search_steps", "timesteps"}
MAX_SIDE = 8192  # pixels; Wan renders 832x480 and 1280x720
MAX_FPS = 240
MAX_GUIDANCE = 100.0  # Wan uses 5-6, distilled checkpoints 1; far beyond, latents overflow (1e38 gave NaN)
MAX_SHIFT = 100.0  # Wan uses 3-8
HANDOVERS = ("planning", "reencode", "direct")
# after-previous: the VAE runs through the previous segment's window before a segment's own latents
# after its initial group, so its first frames leave the decoder as the viewer's frames before them
# did; alone: each segment from its own re-encoded initial latents (MMPL's released code)
DECODES = ("after-previous", "alone")


def sampler_overrides(f: Fields, m: Located, prefix: str) -> dict:
    """The sampler fields present in a mapping (steps, guidance, shift, scheduler, search), checked."""
    out = {
        "scheduler": f.get(m, "scheduler", prefix, "str", choices=SCHEDULERS),
        "steps": f.get(m, "steps", prefix, "int", minimum=1, maximum=1000),
        "shift": f.get(m, "shift", prefix, "float", exclusive_minimum=0.0, maximum=MAX_SHIFT),
        "guidance": f.get(m, "guidance", prefix, "float", minimum=0.0, maximum=MAX_GUIDANCE),
        "search": f.get(m, "search", prefix, "int", minimum=1, maximum=64),
        "search_steps": f.get(m, "search_steps", prefix, "int", minimum=1, maximum=1000),
        "timesteps": _timesteps(f, m, prefix),
    }
    return {k: v for k, v in out.items() if v is not None}


def _timesteps(f: Fields, m: Located, prefix: str) -> tuple[int, ...] | None:
    values = f.get(m, "timesteps", prefix, "list")
    if values is None:
        return None
    ok = (values and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1000 for v in values)
          and all(a > b for a, b in zip(values, values[1:])))
    if not ok:
        f.add(f.line_of(m, "timesteps"), f"{prefix}.timesteps",
              f"expected whole numbers in (0, 1000], decreasing (Self-Forcing's: [1000, 750, 500, 250]), found {values}")
        return None
    return tuple(values)


def sampler_problems(sampler: Sampler) -> list[tuple[str, str, str]]:
    """(key, what is wrong, hint) for a sampler that cannot run as its fields ask."""
    if sampler.scheduler != "few-step":
        return [("timesteps", f"expected no timesteps with the {sampler.scheduler} scheduler (they are the few-step "
                              f"sampler's), found {list(sampler.timesteps)}", "")] if sampler.timesteps else []
    out = []
    if not sampler.timesteps:
        out.append(("timesteps", "expected the timesteps the distilled model was trained at, found none",
                    "Self-Forcing's DMD checkpoints: timesteps: [1000, 750, 500, 250]"))
    if sampler.guidance != 1.0:
        out.append(("guidance", f"expected 1 with the few-step sampler (a distilled model samples without guidance), "
                                f"found {sampler.guidance:g}", "set guidance: 1"))
    return out


def parse_sampler(f: Fields, m: Located, prefix: str, base: Sampler) -> Sampler:
    """A profile's sampler section over `base`; the few-step sampler takes as many steps as timesteps."""
    f.unknown_keys(m, SAMPLER_KEYS, prefix)
    sampler = base.with_overrides(sampler_overrides(f, m, prefix))
    if sampler.timesteps:
        sampler = sampler.with_overrides({"steps": len(sampler.timesteps)})
    for key, message, hint in sampler_problems(sampler):
        f.add(f.line_of(m, key) if key in m else m.line, f"{prefix}.{key}", message, hint)
    return sampler


def _number_map(f: Fields, root: Located, key: str, allowed: list[str]) -> dict[str, float]:
    m = f.get(root, key, "", "mapping") or Located()
    f.unknown_keys(m, set(allowed), key)
    out = {}
    for k in m:
        if k in allowed:
            v = f.get(m, k, key, "float", minimum=0.0)
            if v is not None:
                out[k] = v
    return out
