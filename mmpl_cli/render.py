"""MMPL's tasks for one planned shot on one backend: the initial group, the micro plan, the two
populating stages, the macro chain's hand-over, decoding and stitching (MMPL paper, Sec. 3).

Every task reads top to bottom: gather its inputs from earlier results, prepare context and noise,
denoise (or decode, or stitch), return what it made. Tasks only read results of the tasks they
depend on, so they can be run in any dependency order, by several workers, from a store
(runtime.py). The baselines MMPL is compared with are in baselines.py; the runner dispatches every
kind of task through one table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmpl_cli import baselines
from mmpl_cli.control import StopFlag
from mmpl_cli.errors import InputError, Problem
from mmpl_cli.files import open_image
from mmpl_cli.plan import ShotPlan, Task, derive_seed, segment_task_id
from mmpl_cli.progress import Progress
from mmpl_cli.sampling import blend_edge_noise, make_scheduler, search_score, segment_noise
from mmpl_cli.results import Frames, Latents, Made, Parts, Result
from mmpl_cli.store import RenderStore
from mmpl_cli.terms import GROUPS, WINDOW_KIND, Kind, Seeding
from mmpl_cli.wan import ContextGroup, WanBackend


Results = Mapping[str, Result]  # task id -> what it made (a store's Latents or VideoFile)


def load_init_image(path: Path, width: int, height: int) -> torch.Tensor:
    """An image as pixels [3, H, W] in [-1, 1], centre-cropped to the profile's aspect and resized."""
    try:
        with open_image(path) as img:
            img = img.convert("RGB")
    except OSError as exc:
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

    def __init__(self, backend: WanBackend, plan: ShotPlan, store: RenderStore,
                 progress: Progress | None = None, stop: StopFlag | None = None):
        self.backend = backend
        self.plan = plan
        self.store = store  # only asked where files go; the runtime saves results
        self.progress = progress or Progress()
        self.stop = stop or StopFlag()
        profile = plan.profile
        self.layout = profile.layout
        self.latent_shape = (backend.vae.config.z_dim, self.layout.latents,
                             profile.height // profile.vae_spatial, profile.width // profile.vae_spatial)
        self.tasks: dict[str, Callable[[Task, Results], Made]] = {
            Kind.INITIAL: self._initial,
            Kind.PLAN: partial(self._group, Kind.PLAN, [Kind.INITIAL]),
            Kind.POPULATE_ONE: partial(self._group, Kind.POPULATE_ONE, [Kind.INITIAL, Kind.PLAN]),
            Kind.POPULATE_TWO: partial(self._group, Kind.POPULATE_TWO, [Kind.INITIAL, Kind.PLAN, Kind.POPULATE_ONE]),
            Kind.FULL: partial(baselines.full, self),
            Kind.WINDOW: partial(baselines.sliding_window, self),
            Kind.PROGRESSIVE: partial(baselines.progressive, self),
            Kind.CAUSAL: partial(baselines.causal, self),
            Kind.DECODE: self._decode,
            Kind.STITCH: self._stitch,
        }

    def run(self, task: Task, results: Results) -> Made:
        return self.tasks[task.kind](task, results)

    # -- what every task uses ----------------------------------------------------------------

    def noise(self, segment: int, candidate: int = 0) -> torch.Tensor:
        """The segment's noise; candidate c > 0 is the c-th alternative the noise search may try."""
        seed = self.plan.segments[segment].noise_seed
        return segment_noise(seed if candidate == 0 else derive_seed(seed, f"candidate-{candidate}"), self.latent_shape)

    def step(self, done: int, total: int) -> None:
        self.stop.check()  # a signal abandons the task between two denoising steps
        self.progress.step(done, total)

    def text(self, segment: int):
        return self.backend.text(self.plan.segments[segment].prompt, self.plan.shot.negative_prompt,
                                 self.plan.sampler.guidance)

    def latents(self, results: Results, segment: int, kind: str) -> torch.Tensor:
        return results[segment_task_id(self.plan.shot.id, segment, kind)].latents

    def denoise(self, segment: int, noise: Callable[[int], torch.Tensor], targets, sees, context) -> torch.Tensor:
        return self.denoise_searching(segment, noise, targets, sees, context).latents

    def denoise_searching(self, segment: int, noise: Callable[[int], torch.Tensor], targets, sees, context) -> Latents:
        """Denoise a group from noise(0), or with k-step noise search (sampler.search > 1; the k-step
        noise search paper) from the best of noise(0) ... noise(k - 1): each runs `search_steps` steps
        and the one whose colour estimate is nearest its clean context's wins (sampling.search_score).
        The result says which candidate it started from."""
        sampler, text = self.plan.sampler, self.text(segment)
        best = 0
        if sampler.search > 1 and context:
            steps = min(sampler.search_steps, sampler.steps)
            sigma = float(make_scheduler(sampler).sigmas[steps])
            clean = torch.cat([g.latents for g in context], dim=1)
            scores = [search_score(self.backend.denoise(noise(c), targets, sees, context, text, sampler,
                                                        callback=lambda *_: self.stop.check(), stop_after=steps),
                                   sigma, clean)
                      for c in range(sampler.search)]
            best = min(range(len(scores)), key=scores.__getitem__)
        return Latents(self.backend.denoise(noise(best), targets, sees, context, text, sampler, callback=self.step),
                       candidate=best)

    def segment_latents(self, results: Results, segment: int) -> torch.Tensor:
        """All latents of a segment in order, up to the last one populated."""
        if self.plan.strategy in WINDOW_KIND:
            return self.latents(results, segment, WINDOW_KIND[self.plan.strategy])
        last = self.layout.last_latent(self.plan.seeding)
        out = torch.zeros(self.latent_shape[0], last + 1, *self.latent_shape[2:])
        kinds = GROUPS if self.plan.seeding == Seeding.TERMINAL else GROUPS[:-1]
        for kind in kinds:
            frames = self.layout.group(kind).targets
            latents = self.latents(results, segment, kind)
            for pos, index in enumerate(frames):
                if index <= last:
                    out[:, index] = latents[:, pos]
        return out

    # -- MMPL's groups -------------------------------------------------------------------------

    def _initial(self, task: Task, results: Results) -> Latents:
        k = task.segment
        initial = self.layout.initial
        if k > 0:
            return Latents(self._handover(results, k - 1))
        if self.plan.shot.init_image is not None:
            return Latents(self._from_image())
        noise = self.noise(0)[:, list(initial)]
        return Latents(self.backend.denoise(noise, initial, (), [], self.text(0), self.plan.sampler,
                                            callback=self.step))

    def _from_image(self) -> torch.Tensor:
        """Image-to-video (App. K.1, as MMPL's released I2V code): the still image encoded alone as
        the first latent (layout.image), then the rest of the initial group generated as a group of
        its own that sees it (layout.after_image), so the video does not start with a frozen still."""
        profile, image_at, then = self.plan.profile, self.layout.image, self.layout.after_image
        image = load_init_image(self.plan.shot.init_image, profile.width, profile.height)
        clip = image[:, None].expand(-1, profile.pixel_frames(len(image_at)), -1, -1)  # one frame for one latent
        encoded = self.backend.encode(clip)[:, : len(image_at)]
        out = torch.zeros(encoded.shape[0], len(self.layout.initial), *encoded.shape[2:])
        position = {index: pos for pos, index in enumerate(self.layout.initial)}
        out[:, [position[i] for i in image_at]] = encoded
        if then.targets:
            context = [ContextGroup(encoded, image_at, ())]
            made = self.backend.denoise(self.noise(0)[:, list(then.targets)], then.targets, then.sees, context,
                                        self.text(0), self.plan.sampler, callback=self.step)
            out[:, [position[i] for i in then.targets]] = made
        return out

    def _handover(self, results: Results, previous: int) -> torch.Tensor:
        """Drift-resilient re-encode (Sec. 3.1, App. F): the previous segment's anchor, through the VAE.

        The causal VAE decoder needs a temporally contiguous run that starts from a first-frame
        latent, and carries colour in its cache, so what comes before the anchor decides its pixels:
        `planning` decodes [initial[0], every planning latent up to the anchor's last, in order]
        (all of them exist once the plan task is done: the chain stays parallel, and the anchor is
        decoded in nearly the company the viewer's frames are decoded in); `reencode` decodes
        [initial[0], anchor[0], anchor...] (the repeated anchor latent warms the cache up). Either
        keeps the last pixel frames, as many as the initial group spans, and encodes them as the
        next segment's initial latents. `direct` (App. F's ablation) hands the latents on as they are.
        """
        anchor = self.layout.anchor(self.plan.seeding)
        plan_targets = self.layout.plan.targets
        plan_latents = self.latents(results, previous, Kind.PLAN)
        anchor_latents = plan_latents[:, [plan_targets.index(i) for i in anchor]]
        handover = self.plan.profile.handover
        if handover == "direct":  # App. F ablation: the latents as they are
            return anchor_latents[:, -len(self.layout.initial):].clone()
        first = self.latents(results, previous, Kind.INITIAL)[:, :1]
        span = self.plan.profile.pixel_frames(len(self.layout.initial))
        upto = [plan_targets.index(i) for i in sorted(plan_targets) if i <= max(anchor)]
        if handover == "planning" and self.plan.profile.pixel_frames(1 + len(upto)) >= span:
            run = torch.cat([first, plan_latents[:, upto]], dim=1)
        else:  # reencode, or a layout whose planning run is shorter than the initial group
            run = torch.cat([first, anchor_latents[:, :1], anchor_latents], dim=1)
        pixels = self.backend.decode(run)
        return self.backend.encode(pixels[:, -span:])[:, : len(self.layout.initial)]

    def _group(self, kind: Kind, context_kinds: list[Kind], task: Task, results: Results) -> Latents:
        """The micro plan or a populating stage: one group denoised against the cached clean groups
        of its segment made so far (each with what it saw when it was made)."""
        segment = task.segment
        # 1. What this group makes and what it may look at
        group = self.layout.group(kind)
        context = [ContextGroup(self.latents(results, segment, c), self.layout.group(c).targets,
                                self.layout.group(c).sees) for c in context_kinds]
        # 2. Noise: the segment's own, with App. G's blend at edges that touch planning latents
        planned = None if kind == Kind.PLAN else results[segment_task_id(self.plan.shot.id, segment, Kind.PLAN)].candidate
        planned_noise = None if planned is None else self.noise(segment, planned)  # made once, not per candidate
        # 3. Denoise against the cached clean context
        return self.denoise_searching(segment, partial(self.group_noise, kind, segment, planned=planned,
                                                       planned_noise=planned_noise), group.targets, group.sees, context)

    def group_noise(self, kind: Kind, segment: int, candidate: int, planned: int | None = None,
                    planned_noise: torch.Tensor | None = None) -> torch.Tensor:
        """A group's starting noise from candidate `candidate` of its segment's noise. At an edge
        next to planning latents it is App. G's (Eq. 14) blend of the noise those planning latents
        started from: the plan group's chosen candidate `planned` (the k-step noise search may have
        picked another one for the plan than for this group; `planned_noise`, its noise if at hand)."""
        targets, alpha = self.layout.group(kind).targets, self.plan.profile.noise_blend
        full = self.noise(segment, candidate)
        if alpha is None:
            return full[:, list(targets)]
        anchors = set(self.layout.plan.targets)
        if planned in (None, candidate):
            return blend_edge_noise(full, targets, anchors, alpha, None)
        return blend_edge_noise(full, targets, anchors, alpha,
                                planned_noise if planned_noise is not None else self.noise(segment, planned))

    # -- video -----------------------------------------------------------------------------

    def _decode(self, task: Task, results: Results) -> Frames:
        """The segment's frames that go into the video. With `decode: after-previous` a later segment's
        latents after its initial group are decoded after the previous segment's whole window, whose
        frames are dropped: the causal decoder carries colour in its cache, and so this segment's
        first frames leave it as the viewer's frames before them did (decoded alone, from its own
        re-encoded initial latents, they jumped at every join: docs/method.md)."""
        seg = self.plan.segments[task.segment]
        latents = self.segment_latents(results, task.segment)
        start = seg.keep_from
        if self.plan.decodes_after_previous(task.segment):
            before = self.segment_latents(results, task.segment - 1)
            initial = len(self.layout.initial)  # stand for the previous window's last frames, not decoded again
            latents = torch.cat([before, latents[:, initial:]], dim=1)
            start += self.plan.profile.pixel_frames(before.shape[1]) - self.plan.profile.pixel_frames(initial)
        pixels = self.backend.decode(latents)
        return Frames(to_uint8_frames(pixels[:, start:start + seg.keep_to - seg.keep_from]),
                      self.store.segment_video(self.plan.shot.id, seg.index))

    def _stitch(self, task: Task, results: Results) -> Parts:
        parts = [results[dep].path for dep in task.deps]
        return Parts(parts, self.store.shot_video(self.plan.shot.id))

