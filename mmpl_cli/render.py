"""Run a planned shot on one device: MMPL's groups, the macro chain, decoding and stitching.

Every task reads top to bottom: gather its inputs from earlier results, prepare context and noise,
denoise (or decode, or stitch), return what it made. Tasks only read results of the tasks they
depend on, so they can be run in any dependency order, later by several workers, from a store.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmpl_cli import numerics
from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.plan import (PROGRESSIVE_CHUNK, SLIDING_CONTEXT, WINDOW_KIND, ShotPlan, Task, derive_seed,
                           progressive_levels, segment_task_id)
from mmpl_cli.sampling import (blend_edge_noise, euler_levels, flow_sigma, make_scheduler, search_score,
                               segment_noise)
from mmpl_cli.control import StopFlag, Worker
from mmpl_cli.request import Checked
from mmpl_cli.store import RenderStore
from mmpl_cli.wan import ContextGroup, WanBackend, unknown_prompt_words

Results = dict[str, dict]  # task id -> {"latents": tensor} | {"path": Path}


class Progress:
    """What a render reports; the CLI shows it as a Rich progress bar or as plain log lines."""

    def task_started(self, task: Task, index: int, total: int) -> None: ...

    def task_reused(self, task: Task, index: int, total: int) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def task_finished(self, task: Task, seconds: float) -> None: ...

    def message(self, text: str) -> None: ...


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

    def __init__(self, backend: WanBackend, plan: ShotPlan, store: RenderStore,
                 progress: Progress | None = None, stop: "StopFlag | None" = None):
        self.backend = backend
        self.plan = plan
        self.store = store  # only asked where files go; the caller saves results
        self.progress = progress or Progress()
        self.stop = stop or StopFlag()
        profile = plan.profile
        self.layout = profile.layout
        self.latent_shape = (backend.vae.config.z_dim, self.layout.latents,
                             profile.height // profile.vae_spatial, profile.width // profile.vae_spatial)

    # -- helpers ---------------------------------------------------------------------------

    def _noise(self, segment: int, candidate: int = 0) -> torch.Tensor:
        """The segment's noise; candidate c > 0 is the c-th alternative the noise search may try."""
        seed = self.plan.segments[segment].noise_seed
        return segment_noise(seed if candidate == 0 else derive_seed(seed, f"candidate-{candidate}"), self.latent_shape)

    def _step(self, done: int, total: int) -> None:
        self.stop.check()  # a signal abandons the task between two denoising steps
        self.progress.step(done, total)

    def _text(self, segment: int):
        return self.backend.text(self.plan.segments[segment].prompt, self.plan.shot.negative_prompt,
                                 self.plan.sampler.guidance)

    def _latents(self, results: Results, segment: int, kind: str) -> torch.Tensor:
        return results[segment_task_id(self.plan.shot.id, segment, kind)]["latents"]

    def _context(self, results: Results, segment: int, kinds: list[str]) -> list[ContextGroup]:
        """The clean groups of a segment made so far, each with what it saw when it was made."""
        return [ContextGroup(self._latents(results, segment, kind), self.layout.group(kind).targets,
                             self.layout.group(kind).sees) for kind in kinds]

    def _denoise_stage(self, results: Results, segment: int, kind: str, context_kinds: list[str]) -> dict:
        # 1. What this stage makes and what it may look at
        stage = self.layout.stages()[kind]
        context = self._context(results, segment, context_kinds)
        # 2. Noise: the segment's own, with App. G's blend at edges that touch planning latents
        alpha = self.plan.profile.noise_blend

        def noise(candidate: int) -> torch.Tensor:
            full = self._noise(segment, candidate)
            return full[:, list(stage.targets)] if alpha is None else \
                blend_edge_noise(full, stage.targets, set(self.layout.plan.targets), alpha)

        # 3. Denoise against the cached clean context
        return {"latents": self._denoise(segment, noise, stage.targets, stage.sees, context)}

    def _denoise(self, segment: int, noise: Callable[[int], torch.Tensor], targets, sees, context) -> torch.Tensor:
        """Denoise a group from noise(0), or with k-step noise search (sampler.search > 1, seeds/002)
        from the best of noise(0) ... noise(k - 1): each runs `search_steps` steps and the one whose
        colour estimate is nearest its clean context's wins (sampling.search_score)."""
        sampler, text = self.plan.sampler, self._text(segment)
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
        return self.backend.denoise(noise(best), targets, sees, context, text, sampler, callback=self._step)

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
                                       callback=self._step)
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
        if self.plan.profile.handover == "direct":  # App. F ablation: the latents as they are
            return anchor_latents[:, -len(self.layout.initial):].clone()
        first = self._latents(results, previous, "initial")[:, :1]
        pixels = self.backend.decode(torch.cat([first, anchor_latents[:, :1], anchor_latents], dim=1))
        span = self.plan.profile.pixel_frames(len(self.layout.initial))
        return self.backend.encode(pixels[:, -span:])[:, : len(self.layout.initial)]

    def planning_frames(self, results: Results, segment: int) -> list[tuple[int, np.ndarray]]:
        """(latent index, decoded frame) for every micro-plan latent of a segment, in order: the
        storyboard. Each contiguous run of planning latents is decoded as the hand-over decodes its
        anchor (after the first latent and a repeat of the run's first, to warm the causal cache up);
        a latent's tile is the last of its frames."""
        targets = self.layout.plan.targets
        plan = self._latents(results, segment, "plan")
        first = self._latents(results, segment, "initial")[:, :1]
        runs: list[list[int]] = []
        for i in targets:
            if runs and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        tiles = []
        for run in runs:
            latents = plan[:, [targets.index(i) for i in run]]
            pixels = self.backend.decode(torch.cat([first, latents[:, :1], latents], dim=1))
            per = self.plan.profile.vae_temporal
            frames = to_uint8_frames(pixels[:, -per * len(run):])
            tiles += [(i, frames[per * (k + 1) - 1]) for k, i in enumerate(run)]
        return tiles

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
                                       self.plan.sampler, callback=self._step)
        return {"latents": latents}

    def _run_window(self, task: Task, results: Results) -> dict:
        """Sliding window: the first window from text, every later one conditioned on the previous
        window's last latents as they are (the baseline MMPL's re-encode hand-over improves on)."""
        k, n, c = task.segment, self.layout.latents, SLIDING_CONTEXT
        if k == 0:
            return self._run_full(task, results)
        previous = self._latents(results, k - 1, "window")[:, -c:]
        context = [ContextGroup(previous, tuple(range(c)), ())]
        new = self._denoise(k, lambda candidate: self._noise(k, candidate)[:, c:], tuple(range(c, n)), tuple(range(c)),
                            context)
        return {"latents": torch.cat([previous, new], dim=1)}

    def _run_progressive(self, task: Task, results: Results) -> dict:
        """Progressive autoregressive denoising (PA-VDM, seeds/004, Alg. 1 with its start-up stage).

        The shot is one stream of latents in chunks of PROGRESSIVE_CHUNK. Chunk j joins the window
        as pure noise in round j; every round runs the model once over the window, each chunk at its
        own noise level, and moves every chunk one level down (flow-matching Euler). After `levels`
        rounds chunk j is clean: it leaves the noisy part and stays one round in front as clean context
        (the paper's "keep a clean chunk"). A segment is the stream's latents [16k, 16k + 21), as
        sliding-window cuts it; task k runs the rounds that make those clean and hands on the window
        (the clean chunk and the noisy chunks behind it) to task k + 1. There is no termination
        stage: the noisy chunks left after the last segment are dropped (the paper's base design).
        """
        k, n, c = task.segment, self.layout.latents, PROGRESSIVE_CHUNK
        levels, stride = progressive_levels(n, self.plan.sampler.steps), n - SLIDING_CONTEXT
        last_chunk = lambda segment: (stride * segment + n - 1) // c  # noqa: E731 - the chunk holding its last latent
        stream: dict[int, torch.Tensor] = {}  # latent index in the shot -> latent [C, H, W]
        window: dict[int, torch.Tensor] = {}  # chunk -> its latents [C, c, H, W], oldest first
        first_round = 0
        if k > 0:
            previous = results[segment_task_id(self.plan.shot.id, k - 1, "progressive")]
            for i in range(n):
                stream[stride * (k - 1) + i] = previous["latents"][:, i]
            handed = previous["window"]
            first_round = last_chunk(k - 1) + levels  # the round after the one that made chunk last_chunk(k - 1) clean
            for pos, chunk in enumerate(range(first_round - levels, first_round)):
                window[chunk] = handed[:, pos * c:(pos + 1) * c]
            for i in range(c):  # the clean chunk in front may hold this segment's first new latent
                stream[(first_round - levels) * c + i] = window[first_round - levels][:, i]
        rounds = range(first_round, last_chunk(k) + levels)
        text, shift = self._text(k), self.plan.sampler.shift
        seed = self.plan.segments[k].noise_seed

        def sigma(level: int) -> float:
            return flow_sigma(level / levels, shift)

        for done, r in enumerate(rounds, 1):
            window[r] = segment_noise(derive_seed(seed, f"chunk-{r}"), (self.latent_shape[0], c, *self.latent_shape[2:]))
            window.pop(r - levels - 1, None)  # clean for a round now: out of the window
            chunks = sorted(window)
            x = torch.cat([window[j] for j in chunks], dim=1)
            before = torch.tensor([sigma(max(0, levels - (r - j))) for j in chunks for _ in range(c)])
            after = torch.tensor([sigma(max(0, levels - (r - j) - 1)) for j in chunks for _ in range(c)])
            x = euler_levels(x, self.backend.flow_at_levels(x, before * 1000.0, text, self.plan.sampler.guidance),
                             before, after)
            for pos, j in enumerate(chunks):
                window[j] = x[:, pos * c:(pos + 1) * c]
            clean = r - levels + 1
            if clean >= 0:
                for i in range(c):
                    stream[clean * c + i] = window[clean][:, i]
            self._step(done, len(rounds))
        latents = torch.stack([stream[stride * k + i] for i in range(n)], dim=1)
        handed = torch.cat([window[j] for j in range(rounds[-1] - levels + 1, rounds[-1] + 1)], dim=1)
        return {"latents": latents, "window": handed}

    def segment_latents(self, results: Results, segment: int) -> torch.Tensor:
        """All latents of a segment in order, up to the last one populated."""
        if self.plan.strategy in WINDOW_KIND:
            return self._latents(results, segment, WINDOW_KIND[self.plan.strategy])
        last = self.layout.last_latent(self.plan.seeding)
        out = torch.zeros(self.latent_shape[0], last + 1, *self.latent_shape[2:])
        kinds = ["initial", "plan", "populate_stage_one"] + (["populate_stage_two"] if self.plan.seeding == "terminal" else [])
        for kind in kinds:
            frames = self.layout.group(kind).targets
            latents = self._latents(results, segment, kind)
            for pos, index in enumerate(frames):
                if index <= last:
                    out[:, index] = latents[:, pos]
        return out

    def _run_decode(self, task: Task, results: Results) -> dict:
        seg = self.plan.segments[task.segment]
        pixels = self.backend.decode(self.segment_latents(results, task.segment))
        frames = to_uint8_frames(pixels[:, seg.keep_from:seg.keep_to])
        return {"frames": frames, "target": self.store.segment_video(self.plan.shot.id, seg.index)}

    def _run_stitch(self, task: Task, results: Results) -> dict:
        parts = [results[dep]["path"] for dep in task.deps]
        return {"parts": parts, "target": self.store.shot_video(self.plan.shot.id)}


# --------------------------------------------------------------------------------------------
# A whole shot list on one device, through the render folder's store.


def pick_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(Problem("", None, "--device", f"'{device}' asked for, but no CUDA GPU is visible"))
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def free_gpu_memory_gb() -> list[float] | None:
    """Free memory of every visible GPU, or None without one."""
    if not torch.cuda.is_available():
        return None
    return [torch.cuda.mem_get_info(i)[0] / 1e9 for i in range(torch.cuda.device_count())]  # GB, as memory.py


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    from mmpl_cli import __version__

    return {"mmpl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _manifest(request, shot_list, profile, root, fingerprint, plans, hashes) -> dict:
    return {
        "request": {"shots": str(request.shots), "profile": request.profile, "seeding": plans[0].seeding,
                    "model_path": request.model_path, "device": request.device},
        "resume": request.resume_command(),
        "versions": _versions(),
        "profile": {"name": profile.name, "source": profile.source, "model_path": str(root),
                    "model_fingerprint": fingerprint},
        "shot_list": {"path": str(shot_list.path), "shots": [
            {**{k: v for k, v in shot.__dict__.items() if k not in ("prompts", "init_image")},
             "prompts": [[c.at, c.prompt] for c in shot.prompts],
             "init_image": str(shot.init_image) if shot.init_image else None}
            for shot in shot_list.shots]},
        "shots": [{**{k: v for k, v in p.summary().items() if k != "tasks"},
                   "tasks": [{"id": t.id, "kind": t.kind, "segment": t.segment, "deps": list(t.deps),
                              "hash": hashes[t.id]} for t in p.tasks]}
                  for p in plans],
    }


class _LazyResults(dict):
    """Results by task id: what this run computed, or else what the store holds for the task's hash."""

    def __init__(self, store: RenderStore, hashes: dict[str, str]):
        super().__init__()
        self.store, self.hashes = store, hashes

    def __missing__(self, task_id: str) -> dict:
        found = self.store.load(task_id, self.hashes[task_id])
        if found is None:
            raise MMPLError(f"{task_id} is needed but its result is gone from the render folder; run again")
        self[task_id] = found
        return found


@contextlib.contextmanager
def _heartbeat(store: RenderStore, claim: Path, interval: float):
    """Touch the claim every `interval` seconds while the task runs (a background thread)."""
    finished = threading.Event()

    def beat():
        while not finished.wait(interval):
            store.heartbeat(claim)

    thread = threading.Thread(target=beat, name="mmpl-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


@contextlib.contextmanager
def _peak_memory(device: str):
    """On a CUDA device, the task's peak allocated memory ({"peak_gb": ...}, filled in on exit), for the
    event log: what `benchmarks/gpu_check.py` compares with the memory model."""
    found: dict[str, float] = {}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    yield found
    if cuda:
        found["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def load_backend(profile, root: Path, device: str, seeding: str) -> WanBackend:
    """The profile's model on `device`: folder, transformer checkpoint, dtype, attention, offloading
    (`auto`: when the memory model's peak with everything resident exceeds the GPU's free memory)."""
    from mmpl_cli.memory import resident_peak_gb

    ckpt = profile.checkpoint
    return WanBackend.from_folder(
        root, device=device, dtype=profile.dtype, max_sequence_length=profile.max_sequence_length,
        checkpoint=profile.resolve_checkpoint(), checkpoint_key=ckpt.key if ckpt else "auto",
        checkpoint_naming=ckpt.naming if ckpt else "auto", attention=profile.attention,
        offload=profile.offload,
        memory_gb=resident_peak_gb(profile, root, seeding) if profile.offload == "auto" and device != "cpu" else None)


def render(checked: Checked, progress: Progress | None = None, stop: StopFlag | None = None,
           worker: Worker = Worker()) -> list[Path]:
    """Render every shot of a checked request as one worker; returns the videos.

    Takes ready tasks in priority order (planning chain first), claims each one in the render
    folder, runs it and saves the result there. Every valid finished task is reused, whoever
    made it, so resuming and cooperating with other workers are the same thing. Tasks run with
    the folder's CPU thread count (numerics.py), so their bits do not depend on the launcher.
    """
    from mmpl_cli.plan import plan_shot_list, task_hashes
    from mmpl_cli.profiles import model_fingerprint
    from mmpl_cli.schedule import choose_seeding, tuned_priorities

    progress = progress or Progress()
    stop = stop or StopFlag()
    # 1. Check inputs: the request was validated (request.check) before anything is written
    request, shot_list, profile, plans = checked.request, checked.shot_list, checked.profile, checked.plans
    root, digests = checked.model_root, checked.image_digests
    store = RenderStore(checked.out, warn=progress.message)
    device = pick_device(request.device)
    checkpoint = profile.resolve_checkpoint()
    fingerprint = model_fingerprint(root, checkpoint, profile.checkpoint.key if profile.checkpoint else "")
    proposed, why = choose_seeding(profile, free_gpu_memory_gb(), root) if request.seeding == "auto" else (None, "")

    # 2. Open the render folder: an explicit restart forgets everything, otherwise resume
    if request.restart:
        store.restart([p.shot.id for p in plans])
    if proposed is not None:  # the first worker's choice holds for the whole folder
        seeding = store.seeding_decision(proposed)
        progress.message(f"{worker.name}: {why}" if seeding == proposed else
                         f"{worker.name}: {seeding} seeding, as recorded in the render folder")
        if seeding != plans[0].seeding:
            plans = plan_shot_list(shot_list, profile, seeding)
    here = numerics.environment(device)
    numeric = store.numerics_decision(here)
    for difference in numerics.differences(numeric, here):
        progress.message(f"{worker.name}: warning: {difference}; tasks computed here may differ from "
                         "the folder's others in their last bits")
    hashes = {}
    for plan in plans:
        hashes.update(task_hashes(plan, fingerprint, digests.get(plan.shot.id)))
    store.clean_temporary_files(older_than=worker.claim_timeout)
    store.write_manifest(_manifest(request, shot_list, profile, root, fingerprint, plans, hashes))
    prompts = {p.shot.id: [s.prompt for s in p.segments] + [p.shot.negative_prompt] for p in plans}
    for shot_id, words in unknown_prompt_words(root, prompts).items():
        progress.message(f"{shot_id}: the model's tokenizer does not know {', '.join(map(repr, words))}; "
                         "it reads them as <unk>")

    with numerics.applied(numeric["cpu_threads"]):  # every task of the folder with one thread count
        # 3. Take ready tasks in priority order until every task is done, by us or by another worker
        plan_of = {t.id: plan for plan in plans for t in plan.tasks}
        keys = tuned_priorities(plans, worker.team)
        order = sorted(plan_of, key=keys.__getitem__)
        task_of = {t.id: t for plan in plans for t in plan.tasks}
        results = _LazyResults(store, hashes)
        runners: dict[str, ShotRunner] = {}
        backend = None
        done: set[str] = set()
        while len(done) < len(order):
            stop.check()
            ran = False
            for task_id in order:
                if task_id in done:
                    continue
                task = task_of[task_id]
                if store.is_done(task_id, hashes[task_id]):
                    done.add(task_id)
                    progress.task_reused(task, len(done) - 1, len(order))
                    continue
                if not all(d in done for d in task.deps):
                    continue
                claim = store.try_claim(task_id, worker.name, worker.claim_timeout)
                if claim is None:
                    continue  # another worker is on it
                try:
                    if store.is_done(task_id, hashes[task_id]):  # finished while we were looking
                        done.add(task_id)
                        continue
                    if backend is None:
                        progress.message(f"{worker.name}: loading {profile.name} from {root} on {device}")
                        backend = load_backend(profile, root, device, plans[0].seeding)
                        progress.message(f"{worker.name}: loaded " + "; ".join(backend.loaded))
                    plan = plan_of[task_id]
                    runner = runners.setdefault(plan.shot.id, ShotRunner(backend, plan, store, progress, stop))
                    progress.task_started(task, len(done), len(order))
                    store.log("started", task_id, hashes[task_id], worker=worker.name)
                    started = time.perf_counter()
                    with _heartbeat(store, claim, max(0.5, worker.claim_timeout / 4)), _peak_memory(device) as peak:
                        result = runner.run(task, results)
                    if not store.holds(claim, task_id):
                        progress.message(f"{worker.name}: {task_id} was taken over by another worker; dropping ours")
                        continue
                    results[task_id] = store.save(task_id, hashes[task_id], result, plan.fps)
                    store.log("finished", task_id, hashes[task_id], worker=worker.name,
                              seconds=round(time.perf_counter() - started, 3), threads=torch.get_num_threads(), **peak)
                    done.add(task_id)
                    progress.task_finished(task, time.perf_counter() - started)
                    if request.storyboard and task.kind == "plan":
                        _storyboard_when_planned(runner, results, store, done, progress)
                finally:
                    store.release(task_id)
                ran = True
                break  # priorities may have changed: look again from the top
            if not ran and len(done) < len(order):
                time.sleep(worker.poll)
        if request.storyboard:  # planning finished in an earlier run or by another worker
            for plan in plans:
                has_plan = any(t.kind == "plan" for t in plan.tasks)  # mmpl shots; other strategies have no macro plan
                if has_plan and not store.storyboard(plan.shot.id).exists():
                    if backend is None:
                        backend = load_backend(profile, root, device, plans[0].seeding)
                    runner = runners.setdefault(plan.shot.id, ShotRunner(backend, plan, store, progress, stop))
                    _storyboard_when_planned(runner, results, store, done, progress)
    return [store.shot_video(plan.shot.id) for plan in plans]


def _storyboard_when_planned(runner: ShotRunner, results, store: RenderStore, done: set[str], progress) -> None:
    """Write the shot's storyboard if every one of its planning tasks is finished."""
    from mmpl_cli.storyboard import contact_sheet, shot_rows

    plan = runner.plan
    planning = [t for t in plan.tasks if t.kind == "plan"]
    if not planning or not all(t.id in done for t in planning):
        return
    png = contact_sheet(shot_rows(runner, results, [t.segment for t in planning]))
    progress.message(f"storyboard: wrote {store.write_storyboard(plan.shot.id, png)}")
