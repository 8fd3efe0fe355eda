"""Run a planned shot on one device: MMPL's groups, the macro chain, decoding and stitching.

Every task reads top to bottom: gather its inputs from earlier results, prepare context and noise,
denoise (or decode, or stitch), return what it made. Tasks only read results of the tasks they
depend on, so they can be run in any dependency order, later by several workers, from a store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmpl_cli import video
from mmpl_cli.errors import InputError, Problem
from mmpl_cli.plan import ShotPlan, Task, segment_task_id
from mmpl_cli.sampling import blend_edge_noise, segment_noise
from mmpl_cli.wan import ContextGroup, WanBackend

Results = dict[str, dict]  # task id -> {"latents": tensor} | {"path": Path}


class Progress:
    """What a render reports; the CLI shows it as a Rich progress bar or as plain log lines."""

    def task_started(self, task: Task, index: int, total: int) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def task_finished(self, task: Task, seconds: float) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass
class OutputPaths:
    root: Path

    def shot(self, shot_id: str) -> Path:
        return self.root / f"{shot_id}.mp4"

    def segment(self, shot_id: str, index: int) -> Path:
        return self.root / "segments" / shot_id / f"s{index:03d}.mp4"


def load_init_image(path: Path, width: int, height: int) -> torch.Tensor:
    """An image as pixels [3, H, W] in [-1, 1], centre-cropped to the profile's aspect and resized."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(Problem(str(path), None, "init_image", f"cannot read the image: {exc}")) from None
    scale = max(width / img.width, height / img.height)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    arr = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


class ShotRunner:
    """Executes the tasks of one ShotPlan with one backend."""

    def __init__(self, backend: WanBackend, plan: ShotPlan, outputs: OutputPaths,
                 progress: Progress | None = None):
        self.backend = backend
        self.plan = plan
        self.outputs = outputs
        self.progress = progress or Progress()
        profile = plan.profile
        self.layout = profile.layout
        self.latent_shape = (backend.vae.config.z_dim, self.layout.latents,
                             profile.height // profile.vae_spatial, profile.width // profile.vae_spatial)

    # -- helpers ---------------------------------------------------------------------------

    def _noise(self, segment: int) -> torch.Tensor:
        return segment_noise(self.plan.segments[segment].noise_seed, self.latent_shape)

    def _text(self, segment: int):
        return self.backend.text(self.plan.segments[segment].prompt, self.plan.shot.negative_prompt,
                                 self.plan.sampler.guidance)

    def _latents(self, results: Results, segment: int, kind: str) -> torch.Tensor:
        return results[segment_task_id(self.plan.shot.id, segment, kind)]["latents"]

    def _context(self, results: Results, segment: int, kinds: list[str]) -> list[ContextGroup]:
        """The clean groups of a segment made so far, each with what it saw when it was made."""
        stages = self.layout.stages()
        groups = []
        for kind in kinds:
            frames, sees = (self.layout.initial, ()) if kind == "initial" else (stages[kind].targets, stages[kind].sees)
            groups.append(ContextGroup(self._latents(results, segment, kind), frames, sees))
        return groups

    def _denoise_stage(self, results: Results, segment: int, kind: str, context_kinds: list[str]) -> dict:
        # 1. What this stage makes and what it may look at
        stage = self.layout.stages()[kind]
        context = self._context(results, segment, context_kinds)
        # 2. Noise: the segment's own, with App. G's blend at edges that touch planning latents
        noise = blend_edge_noise(self._noise(segment), stage.targets, set(self.layout.plan.targets),
                                 self.plan.profile.noise_blend)
        # 3. Denoise against the cached clean context
        latents = self.backend.denoise(noise, stage.targets, stage.sees, context, self._text(segment),
                                       self.plan.sampler, callback=self.progress.step)
        return {"latents": latents}

    # -- the tasks -------------------------------------------------------------------------

    def run(self, task: Task, results: Results) -> dict:
        handler: Callable[[Task, Results], dict] = getattr(self, f"_run_{task.kind}")
        return handler(task, results)

    def _run_initial(self, task: Task, results: Results) -> dict:
        k = task.segment
        initial = self.layout.initial
        if k > 0:
            return {"latents": self._handover(results, k - 1)}
        if self.plan.shot.init_image is not None:
            # Image-to-video (App. K.1): the still image, as a clip as long as the initial group, is encoded.
            image = load_init_image(self.plan.shot.init_image, self.plan.profile.width, self.plan.profile.height)
            clip = image[:, None].expand(-1, self.plan.profile.pixel_frames(len(initial)), -1, -1)
            return {"latents": self.backend.encode(clip)[:, : len(initial)]}
        noise = self._noise(0)[:, list(initial)]
        latents = self.backend.denoise(noise, initial, (), [], self._text(0), self.plan.sampler,
                                       callback=self.progress.step)
        return {"latents": latents}

    def _handover(self, results: Results, previous: int) -> torch.Tensor:
        """Drift-resilient re-encode (Sec. 3.1, App. F): the previous segment's anchor, through the VAE.

        The causal VAE decoder needs a temporally contiguous run that starts from a first-frame
        latent: decode [initial[0], anchor[0], anchor...] (the repeated anchor latent warms the
        decoder's temporal cache up), keep the last pixel frames, as many as the initial group
        spans, and encode them as the next segment's initial latents.
        """
        anchor = self.layout.anchor(self.plan.seeding)
        plan_targets = self.layout.plan.targets
        plan_latents = self._latents(results, previous, "plan")
        anchor_latents = plan_latents[:, [plan_targets.index(i) for i in anchor]]
        first = self._latents(results, previous, "initial")[:, :1]
        pixels = self.backend.decode(torch.cat([first, anchor_latents[:, :1], anchor_latents], dim=1))
        span = self.plan.profile.pixel_frames(len(self.layout.initial))
        return self.backend.encode(pixels[:, -span:])[:, : len(self.layout.initial)]

    def _run_plan(self, task: Task, results: Results) -> dict:
        return self._denoise_stage(results, task.segment, "plan", ["initial"])

    def _run_populate_stage_one(self, task: Task, results: Results) -> dict:
        return self._denoise_stage(results, task.segment, "populate_stage_one", ["initial", "plan"])

    def _run_populate_stage_two(self, task: Task, results: Results) -> dict:
        return self._denoise_stage(results, task.segment, "populate_stage_two",
                                   ["initial", "plan", "populate_stage_one"])

    def _run_full(self, task: Task, results: Results) -> dict:
        """Stock Wan: every latent of one window jointly from text (the reference strategy)."""
        frames = tuple(range(self.layout.latents))
        latents = self.backend.denoise(self._noise(task.segment), frames, (), [], self._text(task.segment),
                                       self.plan.sampler, callback=self.progress.step)
        return {"latents": latents}

    def segment_latents(self, results: Results, segment: int) -> torch.Tensor:
        """All latents of a segment in order, up to the last one populated."""
        if self.plan.strategy == "full":
            return self._latents(results, segment, "full")
        last = self.layout.last_latent(self.plan.seeding)
        out = torch.zeros(self.latent_shape[0], last + 1, *self.latent_shape[2:])
        kinds = ["initial", "plan", "populate_stage_one"] + (["populate_stage_two"] if self.plan.seeding == "terminal" else [])
        stages = self.layout.stages()
        for kind in kinds:
            frames = self.layout.initial if kind == "initial" else stages[kind].targets
            latents = self._latents(results, segment, kind)
            for pos, index in enumerate(frames):
                if index <= last:
                    out[:, index] = latents[:, pos]
        return out

    def _run_decode(self, task: Task, results: Results) -> dict:
        seg = self.plan.segments[task.segment]
        pixels = self.backend.decode(self.segment_latents(results, task.segment))
        frames = to_uint8_frames(pixels[:, seg.keep_from:seg.keep_to])
        path = video.write_mp4(frames, self.outputs.segment(self.plan.shot.id, seg.index), self.plan.fps)
        return {"path": path, "frames": len(frames)}

    def _run_stitch(self, task: Task, results: Results) -> dict:
        parts = [results[dep]["path"] for dep in task.deps]
        path = video.stitch(parts, self.outputs.shot(self.plan.shot.id), self.plan.fps)
        return {"path": path}


# --------------------------------------------------------------------------------------------
# A whole shot list on one device.


@dataclass(frozen=True)
class RenderRequest:
    shots: Path
    out: Path | None = None  # default: renders/<shot list name>/
    profile: str | None = None  # overrides the shot list's defaults.profile
    seeding: str = "terminal"
    model_path: str | None = None  # overrides the profile's model folder
    device: str = "auto"


def prepare(request: RenderRequest):
    """Read, validate and plan everything; raises InputError before anything is written."""
    from mmpl_cli.plan import plan_shot_list
    from mmpl_cli.profiles import load_profile
    from mmpl_cli.shotlist import load_shot_list

    shot_list = load_shot_list(request.shots)
    profile_name = request.profile or shot_list.profile
    try:
        profile = load_profile(profile_name, relative_to=request.shots.parent)
    except InputError as exc:
        if request.profile is None:  # it came from the shot list: point at it
            exc = InputError([Problem(str(request.shots), None, "defaults.profile", p.message, p.hint)
                              if not p.file else p for p in exc.problems])
        raise exc from None
    plans = plan_shot_list(shot_list, profile, request.seeding)
    return shot_list, profile, plans


def check_weights(profile, model_path: str | None) -> Path:
    root = profile.resolve_model_path(model_path)
    missing = profile.missing_model_files(model_path)
    if missing:
        how = "pass --model-path DIR"
        if profile.model_path_env:
            how += f" or set {profile.model_path_env}"
        if missing == [str(root)]:
            message = f"model folder not found: {root}"
        else:
            message = f"model folder {root} lacks: {', '.join(missing)}"
        raise InputError(Problem(profile.source, None, "model.path", message,
                                 f"expected a Diffusers-format Wan folder; {how}"))
    return root


def pick_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(Problem("", None, "--device", f"'{device}' asked for, but no CUDA GPU is visible"))
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def render(request: RenderRequest, progress: Progress | None = None) -> list[Path]:
    """Render every shot of a shot list; returns the stitched MP4 paths in shot order."""
    import time

    progress = progress or Progress()
    # 1. Check inputs: everything is validated before a file is written
    shot_list, profile, plans = prepare(request)
    root = check_weights(profile, request.model_path)
    device = pick_device(request.device)
    out = OutputPaths(request.out or Path("renders") / shot_list.name)
    # 2. Load the model once for every shot
    progress.message(f"loading {profile.name} from {root} on {device}")
    backend = WanBackend.from_folder(root, device=device, dtype=profile.dtype,
                                     max_sequence_length=profile.max_sequence_length)
    # 3. Run each shot's tasks in dependency order
    out.root.mkdir(parents=True, exist_ok=True)
    total = sum(len(p.tasks) for p in plans)
    done = 0
    paths = []
    for plan in plans:
        runner = ShotRunner(backend, plan, out, progress)
        results: Results = {}
        for task in plan.tasks:
            progress.task_started(task, done, total)
            started = time.perf_counter()
            results[task.id] = runner.run(task, results)
            done += 1
            progress.task_finished(task, time.perf_counter() - started)
        paths.append(results[plan.tasks[-1].id]["path"])
    return paths
