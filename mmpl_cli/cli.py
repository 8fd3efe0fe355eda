"""The `mmpl` command line: thin Typer commands that parse, call one function and map errors to exit
codes (0 done, 1 failure, 2 bad input, 3 interrupted). Rich progress on a terminal, plain log lines
otherwise (SLURM logs), `--json` for machines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmpl_cli import __version__
from mmpl_cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, InputError, MMPLError, Problem
from mmpl_cli.shotlist import STRATEGIES

app = typer.Typer(
    name="mmpl", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Render long AI video from a YAML shot list with Macro-from-Micro Planning (MMPL).",
)


class Seeding(str, Enum):
    auto = "auto"
    terminal = "terminal"
    midpoint = "midpoint"


Strategy = Enum("Strategy", {name.replace("-", "_"): name for name in STRATEGIES}, type=str)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmpl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Render long AI video from a YAML shot list with Macro-from-Micro Planning (MMPL)."""


def _fail(exc: BaseException) -> None:
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("mmpl: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if isinstance(exc, MMPLError):
        typer.echo(f"mmpl: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)
    if os.environ.get("MMPL_DEBUG"):
        raise exc
    typer.echo(f"mmpl: unexpected error: {type(exc).__name__}: {exc}\n"
               "(set MMPL_DEBUG=1 to see the traceback)", err=True)
    raise typer.Exit(EXIT_FAILURE)


ShotsArg = Annotated[Path, typer.Argument(help="The YAML shot list.", show_default=False)]
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", help="Profile name (see profiles/) or path to a profile YAML; overrides defaults.profile.")]
StrategyOpt = Annotated[Optional[Strategy], typer.Option(
    "--strategy", help="Use this strategy for every shot, whatever the shot list says.")]
SeedingOpt = Annotated[Seeding, typer.Option(
    "--seeding", help="terminal: next segment starts from the terminal plan (throughput); "
                      "midpoint: from the midpoint plan (lower memory peak); "
                      "auto: terminal if the profile's estimate fits the GPUs' free memory, else midpoint.")]


@app.command()
def render(
    shots: ShotsArg,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: renders/<shot list name>].")] = None,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    model_path: Annotated[Optional[str], typer.Option(
        "--model-path", help="Diffusers-format Wan folder; overrides the profile's model.path.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    restart: Annotated[bool, typer.Option(
        "--restart", help="Forget every finished task in the output folder and render from scratch.")] = False,
    strategy: StrategyOpt = None,
    storyboard: Annotated[bool, typer.Option(
        "--storyboard", help="Write <out>/<shot id>.storyboard.png, the decoded frames of the macro plan, "
                             "as soon as a shot's planning is done.")] = False,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Worker processes [default: one per visible GPU, else 1].")] = None,
    claim_timeout: Annotated[float, typer.Option(
        "--claim-timeout", min=1.0, help="Seconds without a heartbeat before another worker takes a task over.")] = 120.0,
    as_worker: Annotated[Optional[str], typer.Option("--as-worker", hidden=True)] = None,
) -> None:
    """Render every shot of SHOTS to <out>/<shot id>.mp4 (and per-segment MP4s under <out>/segments/).

    Every finished task is kept in the output folder: running the same command again after an
    interruption, a crash or an edit of the shot list reuses all work that is still valid.
    SIGINT, SIGTERM and SIGUSR1 stop cleanly (exit code 3).
    """
    from mmpl_cli.numerics import requested_threads
    from mmpl_cli.request import RenderRequest, check

    request = RenderRequest(shots=shots, out=out, profile=profile, seeding=seeding.value,
                            model_path=model_path, device=device, restart=restart, storyboard=storyboard,
                            strategy=strategy.value if strategy is not None else None)
    try:
        checked = check(request)  # bad input stops here: exit 2, nothing written, torch not even imported
        threads = requested_threads()
        ckpt = checked.profile.checkpoint
        if ckpt is not None and as_worker is None:  # a transformer checkpoint is read (memory-mapped) and checked first
            from mmpl_cli.weights import verify_checkpoint

            verify_checkpoint(checked.model_root, checked.profile.resolve_checkpoint(), ckpt.key, ckpt.naming)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    from mmpl_cli.control import Interrupted, StopFlag, Worker
    from mmpl_cli.launch import detect
    from mmpl_cli.numerics import oversubscription

    launch = detect()
    children: list = []
    stop = StopFlag()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        for child in children:  # workers we started stop the same way
            child.send_signal(signum)
        if stop.reason is not None:  # a second signal: stop at once (writes are atomic either way)
            raise Interrupted(f"stopped by {name}")
        stop.request(name)
        typer.echo(f"mmpl: {name} received, stopping after the current step", err=True)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    try:
        if as_worker is not None:
            name, count, team = as_worker, 1, int(os.environ.get("MMPL_WORKERS", "1"))
            index = int(os.environ.get("MMPL_WORKER_INDEX", "0"))
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device == "auto" and gpus:  # one GPU per worker started by the same parent
                request = dataclasses.replace(request, device=f"cuda:{index % gpus}")
                checked = dataclasses.replace(checked, request=request)
        elif launch.mode == "distributed":
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            name, count, team = launch.name, 1, launch.team
            if device == "auto" and gpus:
                request = dataclasses.replace(request, device=f"cuda:{launch.local_rank % gpus}")
                checked = dataclasses.replace(checked, request=request)
            if launch.local_rank == 0 and (warning := oversubscription(threads, launch.local_world_size or 1)):
                typer.echo(f"mmpl: warning: {warning}", err=True)
        else:
            if workers is None:  # one per GPU: only then does this process need torch
                import torch

                count = max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)
            name, count = launch.name, workers or count
            team = count * launch.team
            if count > 1 and (warning := oversubscription(threads, count)):
                typer.echo(f"mmpl: warning: {warning}", err=True)
        if count > 1 or (launch.mode != "plain" and as_worker is None and restart):
            if restart:
                if launch.mode != "plain":
                    raise InputError(Problem("", None, "--restart",
                                             f"--restart under {launch.mode} would let workers erase each other's work",
                                             "run `mmpl render --restart` once on its own, or delete the folder"))
                from mmpl_cli.store import RenderStore

                RenderStore(checked.out).restart([p.shot.id for p in checked.plans])
            code = _run_children(request, checked.out, name, count, team, claim_timeout, children, stop, threads)
            if code:
                raise typer.Exit(code)
            paths = [checked.out / f"{p.shot.id}.mp4" for p in checked.plans]
        else:
            from mmpl_cli.render import render as run_render

            with _progress(name if launch.mode != "plain" or as_worker else None) as progress:
                paths = run_render(checked, progress, stop, Worker(name=name, claim_timeout=claim_timeout, team=team))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one message and an exit code
        if isinstance(exc, typer.Exit):
            raise
        if isinstance(exc, MMPLError) and exc.exit_code != EXIT_BAD_INPUT and not as_worker:
            typer.echo(f"mmpl: {exc}\nfinished tasks are kept; resume with: {request.resume_command()}", err=True)
            raise typer.Exit(exc.exit_code) from None
        _fail(exc)
    if as_worker is None:
        for path in paths:
            typer.echo(f"wrote {path}")


def _run_children(request, out, name, count, team, claim_timeout, children, stop, threads) -> int:
    """Start `count` workers of this render as child processes (each takes GPU i of the visible
    ones) and wait for all of them; returns the exit code to report. Each worker runs its tasks with
    the folder's thread count (numerics.py); OMP_NUM_THREADS only sizes its pool until then."""
    import subprocess

    base = [sys.executable, "-m", "mmpl_cli", "render", *dataclasses.replace(request, out=out).render_args(),
            "--claim-timeout", str(claim_timeout)]
    for i in range(count):
        env = {**os.environ, "MMPL_WORKER_INDEX": str(i), "MMPL_WORKERS": str(team),
               "OMP_NUM_THREADS": str(threads)}
        children.append(subprocess.Popen(base + ["--as-worker", f"{name}/w{i}"], env=env))
    codes = [child.wait() for child in children]
    if stop.reason is not None or 3 in codes:
        typer.echo(f"mmpl: stopped; finished tasks are kept; resume with: {request.resume_command()}", err=True)
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if any(codes) else 0


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="The training config YAML (see examples/train-tiny.yaml).", show_default=False)],
    max_minutes: Annotated[Optional[float], typer.Option(
        "--max-minutes", min=0.0, help="Stop (with a checkpoint) after this many minutes; rerun to go on.")] = None,
) -> None:
    """Train a Wan-architecture model with the MMPL recipe (teacher forcing on the render's groups).

    Stages run in order and checkpoint as they go: after a kill or --max-minutes, the same command
    resumes from the last checkpoint. The trained model is the Diffusers folder <out>/model.
    """
    from mmpl_cli.train import load_train_config

    try:
        cfg = load_train_config(config)
        from mmpl_cli.train import train as run_train

        with _TrainProgress() as progress:
            model = run_train(cfg, progress.report, progress.message, max_minutes)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    typer.echo(f"model folder: {model}")


class _TrainProgress:
    """A Rich bar with loss and speed on a terminal; a plain line every 10 steps in a log."""

    def __init__(self):
        self.rich = sys.stderr.isatty()
        self.bar = None
        self.task = None
        self.stage = None

    def __enter__(self):
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.2f} step/s"),
                                TimeRemainingColumn(), transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def message(self, text: str) -> None:
        (self.bar.console.print if self.bar is not None else typer.echo)(text)

    def report(self, stage: str, step: int, steps: int, loss: float, speed: float) -> None:
        if self.bar is None:
            if step % 10 == 0 or step == steps:
                typer.echo(f"{stage}: step {step}/{steps} loss {loss:.4f} {speed:.2f} step/s")
            return
        if stage != self.stage:
            self.stage = stage
            self.task = self.bar.add_task(stage, total=steps, completed=step - 1, loss=loss, speed=speed)
        self.bar.update(self.task, completed=step, loss=loss, speed=speed)


@app.command()
def doctor(
    profiles: Annotated[Optional[list[str]], typer.Option(
        "--profile", help="Check this profile (name or YAML path) instead of every shipped one; repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Report Python, torch, diffusers, GPUs and their free memory, ffmpeg, flash-attn, and for every
    profile whether its weights are present (and if not, what is missing and where it was looked for).

    Exit code 1 when ffmpeg or the embedded default model is missing, else 0.
    """
    from mmpl_cli.doctor import collect, healthy, render_text

    report = collect(profiles)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in render_text(report):
            typer.echo(line)
    if not healthy(report):
        raise typer.Exit(EXIT_FAILURE)


@app.command("eval")
def eval_videos(
    videos: Annotated[list[Path], typer.Argument(help="MP4 files to measure.", metavar="VIDEO...")],
    segments_from: Annotated[Optional[Path], typer.Option(
        "--segments-from", help="The render folder of the videos: also measure at segment joins and at "
                                "planning-to-content edges.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every metric as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the per-second drift curves to this PNG.")] = None,
) -> None:
    """Measure colour drift: hue-histogram L1 distance and correlation between the first and the last
    frame (seeds/001 Table 5), across every segment join and planning-to-content edge (Tables 13, 14,
    with --segments-from), frame-to-frame flicker, and the drift at every second."""
    from mmpl_cli.evaluate import evaluate_video, format_table, plot_drift, to_json

    try:
        results = [evaluate_video(v, segments_from) for v in videos]
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    typer.echo(to_json(results) if as_json else format_table(results))
    if plot is not None:
        typer.echo(f"wrote {plot_drift(results, plot)}", err=as_json)


@app.command()
def status(
    folder: Annotated[Path, typer.Argument(help="A render folder (the --out of mmpl render).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show, per shot, segment and task, what is done, missing or invalid, and what remains."""
    from mmpl_cli.store import DONE, RenderStore

    try:
        store = RenderStore(folder)
        manifest = store.read_manifest()
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    counts = store.computed_counts()
    shots, tasks = [], []
    for shot in manifest["shots"]:
        states = []
        for t in shot["tasks"]:
            state = store.state(t["id"], t["hash"])
            states.append(state)
            tasks.append({"id": t["id"], "shot": shot["id"], "kind": t["kind"], "segment": t["segment"],
                          "state": state, "computed": counts.get(t["id"], 0)})
        segments = {}
        for t, state in zip(shot["tasks"], states):
            if t["segment"] is not None:
                segments.setdefault(t["segment"], {})[t["kind"]] = state
        video = store.shot_video(shot["id"])
        shots.append({"id": shot["id"], "done": states.count(DONE), "total": len(states),
                      "complete": all(s == DONE for s in states),
                      "video": str(video) if states[-1] == DONE else None,
                      "segments": [{"index": k, "tasks": v} for k, v in sorted(segments.items())]})
    remaining = sum(1 for t in tasks if t["state"] != DONE)
    report = {"folder": str(folder), "profile": manifest["profile"]["name"],
              "seeding": manifest["request"]["seeding"], "shots": shots, "tasks": tasks,
              "remaining": remaining, "resume": manifest.get("resume")}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{folder}: profile {report['profile']}, {report['seeding']} seeding")
    for shot in shots:
        line = f"  {shot['id']}: {shot['done']}/{shot['total']} tasks done"
        typer.echo(line + (f", video {shot['video']}" if shot["video"] else ""))
        for seg in shot["segments"]:
            typer.echo(f"    s{seg['index']:03d}: " + ", ".join(f"{k} {v}" for k, v in seg["tasks"].items()))
    if remaining:
        typer.echo(f"{remaining} task(s) remain; resume with: {report['resume']}")
    else:
        typer.echo("everything is done")


@app.command()
def plan(
    shots: ShotsArg,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Simulate the schedule on this many GPUs.")] = 1,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", help="Free memory per simulated GPU in GB, for --seeding auto [default: no limit].")] = None,
    gantt: Annotated[Optional[Path], typer.Option("--gantt", help="Draw the simulated schedule to this PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    strategy: StrategyOpt = None,
) -> None:
    """Show segments, frames and tasks of every shot, and simulate the multi-GPU schedule with the
    profile's stage costs, without loading any weights."""
    from mmpl_cli.memory import estimate, model_folder
    from mmpl_cli.plan import plan_shot_list
    from mmpl_cli.request import RenderRequest, prepare
    from mmpl_cli.schedule import choose_seeding, draw_gantt, simulate

    try:
        shot_list, prof, plans = prepare(RenderRequest(shots=shots, profile=profile, seeding=seeding.value,
                                                       strategy=strategy.value if strategy is not None else None))
        if seeding is Seeding.auto:
            chosen, why = choose_seeding(prof, [gpu_memory] * gpus if gpu_memory is not None else None)
            if chosen != plans[0].seeding:
                plans = plan_shot_list(shot_list, prof, chosen)
        else:
            why = f"{seeding.value} seeding, as asked"
        memory = estimate(prof, model_folder(prof), gpu_memory)
        peak = {**(memory["peak_gb"] if memory else {}), **prof.memory_gb}.get(plans[0].seeding)  # as profile_peaks
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    schedule = simulate(plans, gpus, peak_memory_gb=peak)
    if gantt is not None:
        draw_gantt(schedule, gantt)
    summary = {
        "shot_list": str(shots),
        "profile": prof.name,
        "seeding": plans[0].seeding,
        "seeding_reason": why,
        "shots": [p.summary() for p in plans],
        "total_frames": sum(p.frames for p in plans),
        "total_tasks": sum(len(p.tasks) for p in plans),
        **schedule.summary(),
        "memory": memory,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{shots}: {len(plans)} shot(s), profile {prof.name} "
               f"({prof.width}x{prof.height}, {prof.fps} fps), {why}")
    for p in plans:
        typer.echo(f"  {p.shot.id}: {p.frames} frames = {p.frames / p.fps:.3f} s, {len(p.segments)} segment(s), "
                   f"{len(p.tasks)} tasks, strategy {p.strategy}, {p.sampler.steps} {p.sampler.scheduler} steps")
        for s in p.segments:
            typer.echo(f"    s{s.index:03d}: frames {s.video_from}-{s.video_from + s.kept - 1}  \"{s.prompt}\"")
        last = p.segments[-1]
        if len(p.segments) > 1 and last.kept * 4 < p.profile.segment_frames:
            typer.echo(f"    note: the last segment adds only {last.kept} frame(s); a duration of "
                       f"{last.video_from / p.fps:g} s would need one segment fewer")
    util = ", ".join(f"{u:.0%}" for u in schedule.utilisation())
    memory = f", peak memory about {schedule.peak_memory_gb:g} GB per GPU" if schedule.peak_memory_gb else ""
    typer.echo(f"simulated on {gpus} GPU(s) with {prof.name}'s stage costs: makespan {schedule.makespan_s:.1f} s "
               f"(lower bound {schedule.lower_bound_s:.1f} s; work {schedule.total_work_s:.1f} s, critical path "
               f"{schedule.critical_path_s:.1f} s), utilisation {util}{memory}")
    if gantt is not None:
        typer.echo(f"wrote {gantt}")


@app.command()
def slurm(
    shots: ShotsArg,
    array: Annotated[int, typer.Option("--array", min=1, help="Number of array tasks (cooperating workers).")],
    gpus_per_task: Annotated[int, typer.Option("--gpus-per-task", min=0, help="GPUs per array task.")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", help="Render folder [default: renders/<shot list name>].")] = None,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    time_limit: Annotated[str, typer.Option("--time", help="Wall time per array task (sbatch --time).")] = "24:00:00",
    partition: Annotated[Optional[str], typer.Option("--partition", help="sbatch --partition.")] = None,
    script: Annotated[Optional[Path], typer.Option("--script", help="Where to write the script [default: <out>.sbatch].")] = None,
) -> None:
    """Write a ready sbatch script: an array of tasks that all run the same `mmpl render` on one
    render folder and cooperate; pre-emption sends SIGUSR1 two minutes ahead and requeues."""
    from mmpl_cli.request import RenderRequest, prepare
    from mmpl_cli.slurm import sbatch_script

    request = RenderRequest(shots=shots, out=out, profile=profile, seeding=seeding.value)
    try:
        shot_list, _, _ = prepare(request)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    folder = request.out_dir(shot_list.name)
    text = sbatch_script(request, folder, array, gpus_per_task, time_limit, partition)
    script = script or folder.with_suffix(".sbatch")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    typer.echo(f"wrote {script}\nsubmit it with:  sbatch {script}\nwatch it with:   mmpl status {folder}")


# --------------------------------------------------------------------------------------------
# Progress: a Rich bar on a terminal, plain lines otherwise.


class _PlainProgress:
    def __init__(self, prefix: str | None = None):
        self.started = time.perf_counter()
        self.prefix = f"{prefix} " if prefix else ""

    def task_started(self, task, index, total):
        self.index, self.total = index, total

    def task_reused(self, task, index, total):
        self.reused = getattr(self, "reused", 0) + 1

    def flush_reused(self):
        if getattr(self, "reused", 0):
            print(f"{self.prefix}reused {self.reused} finished task(s) from the render folder", flush=True)
            self.reused = 0

    def step(self, done, total):
        pass

    def task_finished(self, task, seconds):
        self.flush_reused()
        elapsed = time.perf_counter() - self.started
        print(f"{self.prefix}[{elapsed:7.1f}s] {self.index + 1}/{self.total} {task.id} done in {seconds:.1f}s",
              flush=True)

    def message(self, text):
        print(text, flush=True)


class _RichProgress:
    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=False)
        self.tasks = self.bar.add_task("tasks", total=None)
        self.steps = self.bar.add_task("steps", total=None)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def task_started(self, task, index, total):
        self.bar.update(self.tasks, total=total, completed=index, description="tasks")
        self.bar.update(self.steps, completed=0, total=None, description=f"  {task.id}")

    def task_reused(self, task, index, total):
        self.bar.update(self.tasks, total=total, completed=index + 1, description="tasks")

    def step(self, done, total):
        self.bar.update(self.steps, completed=done, total=total)

    def task_finished(self, task, seconds):
        self.bar.advance(self.tasks)

    def message(self, text):
        self.bar.console.print(text)


class _progress:
    def __init__(self, prefix: str | None = None):
        self.prefix = prefix

    def __enter__(self):
        self.impl = _RichProgress().__enter__() if sys.stdout.isatty() and not self.prefix else _PlainProgress(self.prefix)
        return self.impl

    def __exit__(self, *exc):
        if isinstance(self.impl, _RichProgress):
            self.impl.__exit__(*exc)
        else:
            self.impl.flush_reused()
        return False


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
