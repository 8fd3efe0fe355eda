"""Plan: shot + profile -> segments, frame accounting and the task graph. Pure; no torch, no files.

Frame accounting (documented in README):

* a shot lasts `frames = round(duration * fps)` pixel frames (at least 1);
* a segment is one model window of `latents` latents = 1 + 4 * (latents - 1) pixel frames (81 for Wan);
* terminal seeding keeps the whole window; mid-point seeding keeps the frames up to the midpoint
  anchor (49 for Wan), because what follows the midpoint is never populated;
* a later segment starts from a re-encode of the previous segment's last frames, so its first
  `overlap` pixel frames (the initial latents: 5 for Wan) repeat frames already in the video and
  are dropped; no frame appears twice at a join;
* the last segment is cut so that the video has exactly `frames` frames.

Seeds derive from (shot seed, segment index) only: never from a rank, a device or a list position.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
from dataclasses import dataclass

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.profiles import Profile, Sampler, sampler_problems
from mmpl_cli.shotlist import Shot, ShotList
from mmpl_cli.terms import CAUSAL_BLOCK, GROUPS, LATENT_KINDS, SEEDINGS, WINDOW_KIND, Kind, Seeding, Strategy

# sliding-window (the CausVid / SkyReels-style baseline): each window after the first is conditioned
# on the previous window's last SLIDING_CONTEXT latents, reused as they are (no VAE re-encode)
SLIDING_CONTEXT = 5
# progressive (PA-VDM, Sec. 3.1-3.2, chunked as in its Sec. 4.1): latents move through a window in
# chunks of PROGRESSIVE_CHUNK, one
# noise level apart, with one clean chunk kept in front; segments are cut as sliding-window's are
PROGRESSIVE_CHUNK = 2
# causal (Self-Forcing's chunk-wise rollout, blocks of terms.CAUSAL_BLOCK latents): a later segment
# keeps the previous one's last CAUSAL_CONTEXT latents (two blocks) as clean context, as
# sliding-window keeps its five
CAUSAL_CONTEXT = 6


def progressive_levels(latents: int, steps: int) -> int:
    """Noisy chunks in a progressive window: one per sampling step, as PA-VDM sets it, but no more
    than fit in one model window behind the clean chunk in front (8 for the tiny profile)."""
    return max(1, min(steps, latents // PROGRESSIVE_CHUNK - 1))


@dataclass(frozen=True)
class Task:
    id: str  # "<shot>/s000/plan"; stable across runs and machines
    shot: str
    kind: Kind
    segment: int | None
    deps: tuple[str, ...]


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    prompt: str  # the prompt in force when the segment's first new frame is shown
    noise_seed: int  # seeds the segment's noise for all of its groups
    keep_from: int  # first pixel frame of this segment that goes into the video
    keep_to: int  # one past the last
    video_from: int  # where those frames land in the shot's video

    @property
    def kept(self) -> int:
        return self.keep_to - self.keep_from


@dataclass(frozen=True)
class ShotPlan:
    shot: Shot
    profile: Profile
    sampler: Sampler
    strategy: str
    seeding: str
    frames: int
    segments: tuple[SegmentPlan, ...]
    tasks: tuple[Task, ...]

    @property
    def fps(self) -> int:
        return self.profile.fps

    def task(self, task_id: str) -> Task:
        return next(t for t in self.tasks if t.id == task_id)

    def decodes_after_previous(self, segment: int) -> bool:
        """Whether the VAE runs through the previous segment's window before this one's (profile `decode`)."""
        return decodes_after_previous(self.strategy, self.profile, segment)

    def plan_content_boundaries(self) -> list[int]:
        """Frames of a segment (its own numbering) where planning latents meet content latents: the
        first frame after each such edge (latent i holds frames 4i-3 .. 4i, latent 0 frame 0)."""
        if self.strategy != Strategy.MMPL:
            return []
        layout = self.profile.layout
        planning = set(layout.initial) | set(layout.plan.targets)
        return [self.profile.pixel_frames(i + 1) for i in range(layout.latents - 1)
                if (i in planning) != (i + 1 in planning)]

    def summary(self) -> dict:
        boundaries = self.plan_content_boundaries()  # once: every worker summarises a batch's thousand shots
        return {
            "id": self.shot.id,
            "frames": self.frames,
            "fps": self.fps,
            "duration_s": self.frames / self.fps,
            "requested_duration_s": self.shot.duration,
            "segments": len(self.segments),
            "strategy": self.strategy,
            "seeding": self.seeding,
            "width": self.profile.width,
            "height": self.profile.height,
            "seed": self.shot.seed,
            "negative_prompt": self.shot.negative_prompt,  # the one used: the shot's, else the profile's
            "sampler": dict(self.sampler.__dict__),
            "segment_plan": [
                {"index": s.index, "prompt": s.prompt, "keep": [s.keep_from, s.keep_to],
                 "video_frames": [s.video_from, s.video_from + s.kept],
                 "plan_content_boundaries": [s.video_from + f - s.keep_from for f in boundaries
                                             if s.keep_from < f < s.keep_to]}
                for s in self.segments
            ],
            "tasks": [{"id": t.id, "kind": t.kind, "segment": t.segment, "deps": list(t.deps)} for t in self.tasks],
        }


def derive_seed(shot_seed: int, name: str) -> int:
    """A 63-bit seed from the shot seed and a stable name, the same on every machine."""
    digest = hashlib.sha256(f"{shot_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def segment_task_id(shot_id: str, segment: int, kind: str) -> str:
    return f"{shot_id}/s{segment:03d}/{kind}"


def frame_accounting(frames: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """(keep_from, keep_to, video_from) per segment so that the video has exactly `frames` frames."""
    if window <= overlap:
        raise ValueError("a segment must add frames beyond its initial overlap")
    out = [(0, min(window, frames), 0)]
    produced = out[0][1]
    while produced < frames:
        take = min(window - overlap, frames - produced)
        out.append((overlap, overlap + take, produced))
        produced += take
    return out


def decodes_after_previous(strategy: str, profile: Profile, segment: int) -> bool:
    return strategy == Strategy.MMPL and segment > 0 and profile.decode == "after-previous"


def plan_shot(shot: Shot, profile: Profile, seeding: str, shot_list_path: str = "") -> ShotPlan:
    if seeding not in SEEDINGS:
        raise InputError(Problem("", None, "seeding", f"expected one of {', '.join(SEEDINGS)}, found '{seeding}'"))
    layout = profile.layout
    if shot.strategy is None:  # neither the shot nor the shot list names one: the profile's
        shot = dataclasses.replace(shot, strategy=profile.strategy)
    frames = max(1, round(shot.duration * profile.fps))
    overlap = profile.pixel_frames(len(layout.initial))
    if shot.strategy == Strategy.FULL:
        window = profile.segment_frames
        if frames > window:
            raise InputError(Problem(
                shot_list_path, shot.line, f"{shot.id}.duration",
                f"the 'full' strategy renders one window of {window} frames ({window / profile.fps:g} s at "
                f"{profile.fps} fps), found {shot.duration:g} s", "use strategy 'mmpl' for longer shots"))
        seeding = Seeding.TERMINAL
    elif shot.strategy in (Strategy.SLIDING_WINDOW, Strategy.PROGRESSIVE, Strategy.CAUSAL):
        context = CAUSAL_CONTEXT if shot.strategy == Strategy.CAUSAL else SLIDING_CONTEXT
        window, overlap, seeding = profile.segment_frames, profile.pixel_frames(context), Seeding.TERMINAL
    else:
        window = profile.pixel_frames(layout.last_latent(seeding) + 1)

    segments = []
    for index, (keep_from, keep_to, video_from) in enumerate(frame_accounting(frames, window, overlap)):
        segments.append(SegmentPlan(
            index=index,
            prompt=shot.prompt_at(video_from / profile.fps),
            noise_seed=derive_seed(shot.seed, f"segment-{index}"),
            keep_from=keep_from, keep_to=keep_to, video_from=video_from,
        ))

    tasks: list[Task] = []
    decodes = []
    for seg in segments:
        k = seg.index

        def tid(kind: str, k: int = k) -> str:
            return segment_task_id(shot.id, k, kind)

        previous: list[str] = []  # what the decode reads besides its own segment
        if shot.strategy == Strategy.FULL:
            tasks.append(Task(tid(Kind.FULL), shot.id, Kind.FULL, k, ()))
            latent_tasks = [tid(Kind.FULL)]
        elif shot.strategy in (Strategy.SLIDING_WINDOW, Strategy.PROGRESSIVE, Strategy.CAUSAL):  # a chain of segments
            kind = WINDOW_KIND[shot.strategy]
            tasks.append(Task(tid(kind), shot.id, kind, k, (tid(kind, k - 1),) if k else ()))
            latent_tasks = [tid(kind)]
        else:
            # The hand-over reads the previous segment's initial and planning latents (the macro chain).
            handover = (segment_task_id(shot.id, k - 1, Kind.INITIAL), segment_task_id(shot.id, k - 1, Kind.PLAN)) if k else ()
            tasks.append(Task(tid(Kind.INITIAL), shot.id, Kind.INITIAL, k, handover))
            # each group reads every group of its segment made before it
            groups = GROUPS if seeding == Seeding.TERMINAL else GROUPS[:-1]
            for i, kind in enumerate(groups[1:], 1):
                tasks.append(Task(tid(kind), shot.id, kind, k, tuple(tid(g) for g in groups[:i])))
            latent_tasks = [tid(g) for g in groups]
            if decodes_after_previous(shot.strategy, profile, k):
                previous = [tid(g, k - 1) for g in groups]
        tasks.append(Task(tid(Kind.DECODE), shot.id, Kind.DECODE, k, tuple(latent_tasks + previous)))
        decodes.append(tid(Kind.DECODE))
    tasks.append(Task(f"{shot.id}/{Kind.STITCH}", shot.id, Kind.STITCH, None, tuple(decodes)))

    sampler = _shot_sampler(profile.sampler, shot, shot_list_path)
    if shot.negative_prompt is None:  # neither the shot nor the shot list names one: the profile's
        shot = dataclasses.replace(shot, negative_prompt=profile.negative_prompt)
    if sampler.search > 1 and shot.strategy in (Strategy.FULL, Strategy.PROGRESSIVE):
        raise InputError(Problem(
            shot_list_path, shot.line, f"{shot.id}.search",
            f"noise search picks among candidate noises for groups that have clean context (strategies mmpl and "
            f"sliding-window); strategy '{shot.strategy}' has none",
            "remove search for this shot, or use another strategy"))
    return ShotPlan(shot=shot, profile=profile, sampler=sampler, strategy=shot.strategy, seeding=seeding,
                    frames=frames, segments=tuple(segments), tasks=tuple(tasks))


def _shot_sampler(base: Sampler, shot: Shot, shot_list_path: str) -> Sampler:
    """The profile's sampler with the shot's fields over it, checked as the profile's is."""
    overrides = dict(shot.sampler_overrides)
    if overrides.get("scheduler", "few-step") != "few-step" and "timesteps" not in overrides:
        overrides["timesteps"] = ()  # a multi-step scheduler over a few-step profile
    sampler = base.with_overrides(overrides)
    if sampler.timesteps:
        sampler = sampler.with_overrides({"steps": len(sampler.timesteps)})
    problems = [Problem(shot_list_path, shot.line, f"{shot.id}.{key}", message, hint)
                for key, message, hint in sampler_problems(sampler)]
    if sampler.scheduler == "few-step" and shot.strategy == Strategy.PROGRESSIVE:
        problems.append(Problem(shot_list_path, shot.line, f"{shot.id}.scheduler",
                                "expected unipc or euler with strategy 'progressive' (its rounds step every chunk "
                                "one level down), found few-step"))
    if problems:
        raise InputError(problems)
    return sampler


def plan_shot_list(shot_list: ShotList, profile: Profile, seeding: str) -> list[ShotPlan]:
    """Plan every shot; problems in any of them are reported together."""
    plans, problems = [], []
    for shot in shot_list.shots:
        try:
            plans.append(plan_shot(shot, profile, seeding, str(shot_list.path)))
        except InputError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(problems)
    return plans


@functools.lru_cache(maxsize=256)
def _fields(value) -> dict:
    """A frozen dataclass's fields as plain data (read only), made once per distinct value: the shots
    of a batch share their layout and mostly their sampler, and asdict was half of hashing 1,000 shots."""
    return dataclasses.asdict(value)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# Stand-ins for the model and the sampler in a task's hash text, replaced there by their text, which is
# made once per shot (encoding them was two thirds of hashing a task: 1,000 shots, 0.2 s a worker). Random
# (a process's own), so no prompt holds one: the first match is the stand-in.
_MODEL, _SAMPLER = (f"mmpl-{what}-{secrets.token_hex(16)}" for what in ("model", "sampler"))


def _digest(value: dict, spliced: tuple[tuple[str, str], ...] = ()) -> str:
    """The sha256 of `value`'s canonical JSON, where each (stand-in, text) of `spliced` is replaced by
    that text: the same digest as of `value` holding what the text encodes."""
    text = _canonical(value)
    for stand_in, encoded in spliced:
        text = text.replace(stand_in, encoded, 1)
    return hashlib.sha256(text.encode()).hexdigest()


I2V_LAYOUT = ("image", "after_image")  # hashed by the image-to-video initial task alone: other folders resume


def task_hashes(plan: ShotPlan, model_fingerprint: str, init_image_digest: str | None = None) -> dict[str, str]:
    """A content hash per task from everything its output depends on, and its inputs' hashes (Merkle).

    A segment's tasks depend on the prompt in force in that segment, the negative prompt, the
    sampler, the segment's noise seed, the model and the hashes of the tasks they read. So an edit
    from second 20 of a shot leaves every earlier segment's hash alone, and an edit of one shot
    leaves other shots alone. Output paths, shot order and the shot id are not part of any hash
    (the id only says where a task's file lives).
    """
    profile = plan.profile
    layout = _fields(profile.layout)
    model = {
        "weights": model_fingerprint, "dtype": profile.dtype, "size": [profile.width, profile.height],
        "vae": [profile.vae_temporal, profile.vae_spatial], "text_tokens": profile.max_sequence_length,
        "layout": {k: v for k, v in layout.items() if k not in I2V_LAYOUT},
        "noise_blend": profile.noise_blend,
    }
    # search settings count only when not the defaults: folders rendered before they existed still resume
    default = Sampler()
    sampler = {k: v for k, v in _fields(plan.sampler).items()
               if not (k in ("search", "search_steps", "timesteps") and v == getattr(default, k))}
    spliced = ((f'"{_MODEL}"', _canonical(model)), (f'"{_SAMPLER}"', _canonical(sampler)))
    model, sampler = _MODEL, _SAMPLER
    hashes: dict[str, str] = {}
    for task in plan.tasks:
        parts: dict = {"kind": task.kind, "deps": [hashes[d] for d in task.deps]}
        seg = plan.segments[task.segment] if task.segment is not None else None
        if task.kind == Kind.INITIAL and task.segment > 0:
            parts.update(model=model, anchor=list(profile.layout.anchor(plan.seeding)))  # VAE hand-over only
            if profile.handover != "reencode":  # kept out of reencode's hash: folders from before `planning` resume with it
                parts.update(handover=profile.handover)
        elif task.kind == Kind.INITIAL and init_image_digest is not None:  # the image, then a generated group
            parts.update(model=model, init_image=init_image_digest,
                         image_to_video={k: layout[k] for k in I2V_LAYOUT},
                         prompt=seg.prompt, negative_prompt=plan.shot.negative_prompt, sampler=sampler,
                         noise_seed=seg.noise_seed)
        elif task.kind in LATENT_KINDS:
            parts.update(model=model, prompt=seg.prompt, negative_prompt=plan.shot.negative_prompt,
                         sampler=sampler, noise_seed=seg.noise_seed)
            if plan.sampler.search > 1 and task.kind == Kind.PLAN:
                parts.update(keeps="its candidate")  # plan files from before did not: computed again
            if plan.sampler.search > 1 and task.kind in (Kind.POPULATE_ONE, Kind.POPULATE_TWO):
                parts.update(edge_noise="the plan's candidate")  # since the edge blend follows the plan's choice
            if task.kind == Kind.WINDOW:
                parts.update(context=SLIDING_CONTEXT)
            if task.kind == Kind.CAUSAL:
                parts.update(context=CAUSAL_CONTEXT, block=CAUSAL_BLOCK)
            if task.kind == Kind.PROGRESSIVE:
                parts.update(context=SLIDING_CONTEXT, chunk=PROGRESSIVE_CHUNK,
                             levels=progressive_levels(profile.layout.latents, plan.sampler.steps))
        elif task.kind == Kind.DECODE:
            parts.update(model=model, keep=[seg.keep_from, seg.keep_to], fps=plan.fps,
                         last_latent=profile.layout.last_latent(plan.seeding))
            if plan.decodes_after_previous(task.segment):  # the previous window's tasks are among its deps
                parts.update(decode="after-previous")
        else:  # stitch
            parts.update(fps=plan.fps)
        hashes[task.id] = _digest(parts, spliced)
    return hashes
