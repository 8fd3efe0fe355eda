"""The runtime: one worker rendering a checked request against its render folder. It takes ready
tasks in priority order, claims each one (claims.py), keeps a heartbeat on the claim while the task
runs, saves what the task made (encoding videos into the store's temporary paths), and releases the
claim. It also picks the device, loads the backend once a task needs it, writes the manifest, and
applies the folder's decisions (seeding, numerics) so every worker runs the same graph with the
same bits. The tasks themselves are in render.py and baselines.py; who the worker is and which
processes it starts is launch.py's business.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmpl_cli import numerics, video
from mmpl_cli.claims import Claims, numerics_decision, owner_decision, seeding_decision, shot_list_identity
from mmpl_cli.control import StopFlag, Worker
from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.plan import ShotPlan, Task
from mmpl_cli.progress import Progress
from mmpl_cli.request import Checked, shot_record
from mmpl_cli.results import Frames, Latents, Made, Result
from mmpl_cli.store import RenderStore
from mmpl_cli.storyboard import write_when_planned
from mmpl_cli.terms import Kind
from mmpl_cli.weights import entry_identity
from mmpl_cli.worklist import HeldResults, LostResult, ReadyTasks

if TYPE_CHECKING:
    from mmpl_cli.render import ShotRunner
    from mmpl_cli.wan import WanBackend


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
    from importlib.metadata import version  # not the packages themselves: seconds of imports for strings

    from mmpl_cli import __version__

    return {"mmpl": __version__, "torch": torch.__version__, "diffusers": version("diffusers"),
            "transformers": version("transformers")}


def _manifest(request, shot_list, profile, root, fingerprint, plans, hashes) -> dict:
    return {
        "request": {"shots": str(request.shots), "profile": request.profile, "seeding": plans[0].seeding,
                    "model_path": request.model_path, "device": request.device},
        "resume": request.resume_command(),
        "versions": _versions(),
        "profile": {"name": profile.name, "source": profile.source, "model_path": str(root),
                    "model_fingerprint": fingerprint},
        "shot_list": {"path": str(shot_list.path), "shots": [shot_record(shot) for shot in shot_list.shots]},
        "shots": [{**{k: v for k, v in p.summary().items() if k != "tasks"},
                   "tasks": [{"id": t.id, "kind": t.kind, "segment": t.segment, "deps": list(t.deps),
                              "hash": hashes[t.id]} for t in p.tasks]}
                  for p in plans],
    }


# A task found claimed by a live worker is not asked for again within this many seconds: each ask lists
# and reads the shot's claims (round trips on NFS), and W workers walking one priority order would ask for
# the W - 1 tasks the others hold at every pick. A takeover (after `claim_timeout`) is late by at most this.
LOOK_AGAIN = 1.0

class _Heartbeat:
    """One background thread for the worker's whole run that touches the claim the worker holds, every
    `interval` seconds, from the claim to its release (loading the model and saving count). Starting
    and joining a thread per task cost a worker about a millisecond of every task, and more on a
    machine whose cores are busy. The touch and the change of claim hold one lock, so a released claim
    is not touched again; a failed touch (a file system error) is said once per outage of a claim, and retried."""

    def __init__(self, claims: Claims, interval: float, warn: Callable[[str], None]):
        self.claims, self.interval, self.warn = claims, interval, warn
        self.claim: Path | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.failed = False
        self.thread = threading.Thread(target=self._beat, name="mmpl-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.claims.close()  # the worker's record, which its claims linked

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):  # a new claim is fresh: at most `interval` old when touched
            with self.lock:
                if self.claim is None:
                    continue
                try:
                    self.claims.heartbeat(self.claim)
                except OSError as exc:
                    if not self.failed:
                        self.warn(f"warning: cannot touch the claim {self.claim.name} ({exc.strerror or exc}); "
                                  "trying again: other workers may take the task over meanwhile")
                    self.failed = True
                    continue
                if self.failed:  # said once per outage: the next one is said again
                    self.warn(f"the claim {self.claim.name} is touched again")
                    self.failed = False

    def hold(self, claim: Path | None) -> None:
        """Keep `claim` alive from now on (None: the worker holds no claim)."""
        with self.lock:
            self.claim, self.failed = claim, self.failed and claim == self.claim


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
    from mmpl_cli.wan import WanBackend

    ckpt = profile.checkpoint
    return WanBackend.from_folder(
        root, device=device, dtype=profile.dtype, max_sequence_length=profile.max_sequence_length,
        checkpoint=profile.resolve_checkpoint(), checkpoint_key=ckpt.key if ckpt else "auto",
        checkpoint_naming=ckpt.naming if ckpt else "auto", attention=profile.attention,
        offload=profile.offload,
        memory_gb=resident_peak_gb(profile, root, seeding) if profile.offload == "auto" and device != "cpu" else None)


def render(checked: Checked, progress: Progress | None = None, stop: StopFlag | None = None,
           worker: Worker = Worker(), make_runner: Callable[[ShotPlan], ShotRunner] | None = None) -> list[Path]:
    """Render every shot of a checked request as one worker; returns the videos.

    Takes ready tasks in priority order (planning chain first), claims each one in the render
    folder, runs it and saves the result there. Every valid finished task is reused, whoever
    made it, so resuming and cooperating with other workers are the same thing. Tasks run with
    the folder's CPU thread count (numerics.py), so their bits do not depend on the launcher.
    `make_runner(plan)` gives what runs a shot's tasks (default: a ShotRunner on the profile's model,
    loaded when the first task needs it; benchmarks/scale.py passes one that computes nothing).
    (The CLI imports this module through launch.import_render, which freezes the collector's heap.)
    """
    return _render(checked, progress or Progress(), stop or StopFlag(), worker, make_runner)


def _render(checked: Checked, progress: Progress, stop: StopFlag, worker: Worker,
            make_runner: Callable[[ShotPlan], ShotRunner] | None) -> list[Path]:
    from mmpl_cli.plan import plan_shot_list, task_hashes
    from mmpl_cli.profiles import model_fingerprint
    from mmpl_cli.schedule import choose_seeding, tuned_priorities

    # 1. Check inputs: the request was validated (request.check) before anything is written
    request, shot_list, profile, plans = checked.request, checked.shot_list, checked.profile, checked.plans
    root, digests = checked.model_root, checked.image_digests
    store = RenderStore(checked.out, warn=progress.message, worker=worker.name)
    claims = Claims(store.claims_folder, warn=progress.message)
    device = pick_device(request.device)
    checkpoint = profile.resolve_checkpoint()
    fingerprint = model_fingerprint(root, checkpoint, entry_identity(profile.checkpoint.key) if profile.checkpoint else "",
                                    say=progress.message)
    proposed, why = choose_seeding(profile, free_gpu_memory_gb(), root) if request.seeding == "auto" else (None, "")

    # 2. Open the render folder: an explicit restart forgets everything, otherwise resume
    if request.restart:
        store.restart([p.shot.id for p in plans])
    owner_decision(store.decision("owner"), shot_list_identity(shot_list.path), store.root)
    if proposed is not None:  # the first worker's choice holds for the whole folder
        seeding = seeding_decision(store.decision("seeding"), proposed)
        progress.message(why if seeding == proposed else f"{seeding} seeding, as recorded in the render folder")
        if seeding != plans[0].seeding:
            plans = plan_shot_list(shot_list, profile, seeding)
    here = numerics.environment(device)
    numeric = numerics_decision(store.decision("numerics"), here)
    for difference in numerics.differences(numeric, here):
        progress.message(f"warning: {difference}; tasks computed here may differ from "
                         "the folder's others in their last bits")
    hashes = {}
    for plan in plans:
        hashes.update(task_hashes(plan, fingerprint, digests.get(plan.shot.id)))
    store.clean_temporary_files(older_than=worker.claim_timeout)
    store.note_absent(hashes)  # what another worker writes from now on is checked by its header until read
    store.write_manifest(_manifest(request, shot_list, profile, root, fingerprint, plans, hashes))
    prompts = {p.shot.id: [s.prompt for s in p.segments] + [p.shot.negative_prompt] for p in plans}
    from mmpl_cli.vocabulary import unknown_prompt_words  # tokenizers only: no diffusers, no transformers

    for shot_id, words in unknown_prompt_words(root, prompts).items():
        progress.message(f"{shot_id}: the model's tokenizer does not know {', '.join(map(repr, words))}; "
                         "it reads them as <unk>")

    heartbeat = _Heartbeat(claims, max(0.5, worker.claim_timeout / 4), progress.message)
    with numerics.applied(numeric["cpu_threads"]), heartbeat:  # every task of the folder with one thread count
        # 3. Take ready tasks in priority order until every task is done, by us or by another worker
        plan_of = {t.id: plan for plan in plans for t in plan.tasks}
        task_of = {t.id: t for plan in plans for t in plan.tasks}
        ready = ReadyTasks(task_of, tuned_priorities(plans, worker.team))
        results = HeldResults(store, hashes, ready)
        runners: dict[str, ShotRunner] = {}
        held_elsewhere: dict[str, float] = {}  # task -> when to ask for its claim again
        backend = None
        total = len(task_of)

        def model_runner(plan: ShotPlan) -> ShotRunner:
            from mmpl_cli.render import ShotRunner  # the model's code: imported when a task needs it

            nonlocal backend
            if backend is None:
                progress.message(f"loading {profile.name} from {root} on {device}")
                backend = load_backend(profile, root, device, plans[0].seeding)
                progress.message("loaded " + "; ".join(backend.loaded))
            return ShotRunner(backend, plan, store, progress, stop)

        def runner_of(plan: ShotPlan) -> ShotRunner:
            if plan.shot.id not in runners:
                runners[plan.shot.id] = (make_runner or model_runner)(plan)
            return runners[plan.shot.id]

        def finished(task_id: str) -> None:
            if task_id in ready.done:
                return
            ready.finished(task_id)
            results.finished(task_of[task_id])
            held_elsewhere.pop(task_id, None)
            if task_of[task_id].kind == Kind.STITCH:  # the shot is complete: its runner is not needed
                runners.pop(task_of[task_id].shot, None)

        while len(ready.done) < total:
            stop.check()
            ran = False
            looking = ready.in_order()  # only tasks whose inputs are done, best first
            for task_id in looking:
                task = task_of[task_id]
                if store.is_done(task_id, hashes[task_id]):  # finished earlier, or by another worker
                    finished(task_id)
                    progress.task_reused(task, len(ready.done) - 1, total)
                    continue
                if held_elsewhere.get(task_id, 0.0) > time.monotonic():
                    continue  # another worker was on it a moment ago
                claim = claims.try_claim(task_id, worker.name, worker.claim_timeout)
                if claim is None:  # another worker is on it: not asked again for LOOK_AGAIN seconds
                    held_elsewhere[task_id] = time.monotonic() + LOOK_AGAIN
                    continue
                try:
                    heartbeat.hold(claim)
                    if store.is_done(task_id, hashes[task_id]):  # finished while we were looking
                        finished(task_id)
                        continue
                    plan = plan_of[task_id]
                    runner = runner_of(plan)
                    progress.task_started(task, len(ready.done), total)
                    store.event_log.log("started", task_id, hashes[task_id], worker=worker.name)
                    started = time.perf_counter()
                    try:
                        with _peak_memory(device) as peak:
                            result = runner.run(task, results)
                    except LostResult as lost:  # counted done, damaged when read (the store said so): again
                        ready.reopen(lost.task_id)
                        continue
                    _check_finite(task, result, plan)
                    if not claims.holds(claim, task_id):
                        progress.message(f"{task_id} was taken over by another worker; dropping ours")
                        continue
                    results.keep(task_id, _save(store, task, hashes[task_id], result, plan.fps))
                    del result
                    finished(task_id)
                    store.event_log.log("finished", task_id, hashes[task_id], worker=worker.name,
                              seconds=round(time.perf_counter() - started, 3),
                              threads=torch.get_num_threads(), held=results.latents_held(), **peak)
                    progress.task_finished(task, time.perf_counter() - started)
                    if request.storyboard and task.kind == Kind.PLAN:
                        write_when_planned(runner, results, store, ready.done, progress)
                finally:
                    heartbeat.hold(None)
                    claims.release(claim)
                ran = True
                break  # priorities may have changed: look again from the top
            looking.close()  # what was skipped goes back among the ready tasks
            if not ran and len(ready.done) < total:
                time.sleep(worker.poll)
        if request.storyboard:  # planning finished in an earlier run or by another worker
            for plan in plans:
                has_plan = any(t.kind == Kind.PLAN for t in plan.tasks)  # mmpl shots; other strategies have no macro plan
                if has_plan and not store.storyboard(plan.shot.id).exists():
                    write_when_planned(runner_of(plan), results, store, ready.done, progress)
    return [store.shot_video(plan.shot.id) for plan in plans]


def _check_finite(task: Task, made: Made, plan) -> None:
    """A result with NaN or inf is never saved: it would be reused as finished work forever after."""
    if isinstance(made, Latents) and not all(bool(torch.isfinite(t).all()) for t in (made.latents, made.window)
                                             if t is not None):
        raise MMPLError(f"{task.id}: the model's output is not finite (NaN or inf), so nothing was saved; "
                        f"lower guidance ({plan.sampler.guidance:g}) or shift ({plan.sampler.shift:g}), or check "
                        "the model's weights and dtype")


def _save(store: RenderStore, task: Task, task_hash: str, made: Made, fps: int) -> Result:
    """Persist what a task made: latents as they are, frames and parts encoded by ffmpeg into the
    store's temporary path for the video, which is moved into place whole."""
    if isinstance(made, Latents):
        return store.save(task.id, task_hash, made)
    with store.video_file(made.target) as tmp:
        if isinstance(made, Frames):
            video.write_mp4(made.frames, tmp, fps)
        else:
            video.stitch(made.parts, tmp, fps)
    return store.save_video(task.id, task_hash, made.target)
