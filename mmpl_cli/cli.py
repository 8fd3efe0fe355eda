"""The `mmpl` command line. Every command parses, checks, runs one function and prints; one error
boundary maps what goes wrong to an exit code (0 done, 1 failure, 2 bad input, 3 interrupted) and
one line on stderr, never a traceback (MMPL_DEBUG=1 shows it). Progress: progress.py.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmpl_cli import __version__, launch
from mmpl_cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, MMPLError, printable
from mmpl_cli.files import check_output
from mmpl_cli.terms import SEEDINGS, STRATEGIES

app = typer.Typer(
    name="mmpl", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: paragraphs reflowed, every [default: ...] shown as written
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Render long AI video from a YAML shot list with Macro-from-Micro Planning (MMPL). "
         "Start with `mmpl render examples/shots.yaml`; `mmpl COMMAND -h` tells more.",
)

Seeding = Enum("Seeding", {name: name for name in ("auto", *SEEDINGS)}, type=str)
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


def _say(text: str) -> None:
    typer.echo(f"mmpl: {printable(text)}", err=True)


@contextmanager
def errors(resume: str | None = None, cooperative: bool = False) -> Iterator[None]:
    """The error boundary of every command: one message and an exit code. With `resume`, a failure
    that is not bad input also says that finished tasks are kept and how to go on. A signal stops
    the work inside at once, or (`cooperative`) when the work next checks launch.STOP."""
    try:
        with launch.interruptible(not cooperative):
            yield
    except typer.Exit:
        raise
    except MMPLError as exc:  # a signal raises Interrupted (launch.py's handlers: no KeyboardInterrupt)
        if exc.exit_code == EXIT_INTERRUPTED and resume is None:
            _say(str(exc))
        elif resume is not None and exc.exit_code != EXIT_BAD_INPUT:
            _say(f"{exc}\nfinished tasks are kept; resume with: {resume}")
        else:
            _say(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one message and an exit code
        if os.environ.get("MMPL_DEBUG"):
            raise
        _say(f"unexpected error: {type(exc).__name__}: {exc}\n(set MMPL_DEBUG=1 to see the traceback)")
        raise typer.Exit(EXIT_FAILURE) from None


ShotsArg = Annotated[Path, typer.Argument(help="The YAML shot list.", show_default=False, metavar="SHOTS")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", metavar="FOLDER", help="The render folder.",
                                                show_default="renders/<shot list name>")]
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", metavar="NAME|YAML", show_default="the shot list's defaults.profile, else tiny",
    help="Profile name (see profiles/) or path to a profile YAML.")]
StrategyOpt = Annotated[Optional[Strategy], typer.Option(
    "--strategy", show_default="as the shot list says",
    help="Use this strategy for every shot: mmpl, or a baseline to compare with.")]
SeedingOpt = Annotated[Seeding, typer.Option(
    "--seeding", help="terminal: the next segment starts from the terminal plan (throughput); midpoint: "
                      "from the mid-point plan (lower memory peak); auto: terminal if mmpl's memory model "
                      "says it fits the GPUs' free memory, else midpoint.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@app.command(short_help="Render every shot of a shot list to MP4 (resumable).")
def render(
    shots: ShotsArg,
    out: OutOpt = None,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    model_path: Annotated[Optional[str], typer.Option(
        "--model-path", metavar="FOLDER", show_default="the profile's model.path",
        help="Diffusers-format Wan folder.")] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")] = "auto",
    restart: Annotated[bool, typer.Option(
        "--restart", help="Forget every finished task in the render folder and render from scratch.")] = False,
    strategy: StrategyOpt = None,
    storyboard: Annotated[bool, typer.Option(
        "--storyboard", help="Write <out>/<shot id>.storyboard.png, the decoded frames of the macro plan, "
                             "as soon as a shot's planning is done.")] = False,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, metavar="N", show_default="one per visible GPU, else 1",
        help="Worker processes to start on this machine.")] = None,
    claim_timeout: Annotated[float, typer.Option(
        "--claim-timeout", min=1.0, metavar="SECONDS",
        help="Seconds without a heartbeat before another worker takes a task over.")] = 120.0,
    as_worker: Annotated[Optional[str], typer.Option("--as-worker", hidden=True)] = None,
) -> None:
    """Render every shot of SHOTS to <out>/<shot id>.mp4 (and per-segment MP4s under <out>/segments/).

    Every finished task is kept in the render folder: running the same command again after an
    interruption, a crash or an edit of the shot list reuses all work that is still valid. Several
    processes (--workers, torchrun, accelerate launch, SLURM array tasks) on one folder share the
    work. SIGINT, SIGTERM and SIGUSR1 stop cleanly (exit code 3).
    """
    from mmpl_cli.numerics import requested_threads
    from mmpl_cli.request import RenderRequest, check

    request = RenderRequest(shots=shots, out=out, profile=profile, seeding=seeding.value,
                            model_path=model_path, device=device, restart=restart, storyboard=storyboard,
                            strategy=strategy.value if strategy is not None else None)
    with errors():  # bad input stops here: exit 2, nothing written, torch not even imported
        checked = check(request)
        threads = requested_threads()
        ckpt = checked.profile.checkpoint
        if ckpt is not None and as_worker is None:  # a transformer checkpoint is read (memory-mapped) and checked first
            from mmpl_cli.weights import verify_checkpoint

            verify_checkpoint(checked.model_root, checked.profile.resolve_checkpoint(), ckpt.key, ckpt.naming)
    with errors(resume=None if as_worker else request.resume_command(), cooperative=True):
        me = launch.role(device, workers, as_worker, threads, warn=lambda warning: _say(f"warning: {warning}"))
        paths = launch.run(checked, me, restart, claim_timeout, threads)
    if as_worker is None:
        for path in paths:
            typer.echo(printable(f"wrote {path}"))


@app.command(short_help="Show what is done in a render folder and what remains.")
def status(
    folder: Annotated[Path, typer.Argument(help="A render folder (the --out of mmpl render).", show_default=False,
                                           metavar="FOLDER")],
    as_json: JsonOpt = False,
) -> None:
    """Show, per shot, segment and task, what is done, missing or invalid, and what remains."""
    from mmpl_cli.reports import status_lines
    from mmpl_cli.store import RenderStore

    with errors():
        report = RenderStore(folder).report()
    pretty = {"indent": 2} if os.isatty(1) else {}  # piped: one line, json's C encoder (10x quicker on big folders)
    typer.echo(json.dumps(report, **pretty) if as_json else "\n".join(map(printable, status_lines(report))))


@app.command(short_help="Show segments and tasks; simulate the schedule and memory on N GPUs.")
def plan(
    shots: ShotsArg,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    gpus: Annotated[int, typer.Option("--gpus", min=1, metavar="N", help="Simulate the schedule on this many GPUs.")] = 1,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", metavar="GB", show_default="no limit",
        help="Free memory per simulated GPU in GB, for --seeding auto.")] = None,
    gantt: Annotated[Optional[Path], typer.Option("--gantt", metavar="PNG", help="Draw the simulated schedule.")] = None,
    as_json: JsonOpt = False,
    strategy: StrategyOpt = None,
) -> None:
    """Show segments, frames and tasks of every shot, and simulate the multi-GPU schedule with the
    profile's stage costs and mmpl's memory model, without loading any weights."""
    from mmpl_cli.memory import estimate, model_folder
    from mmpl_cli.plan import plan_shot_list
    from mmpl_cli.reports import plan_lines, plan_summary
    from mmpl_cli.request import RenderRequest, prepare
    from mmpl_cli.schedule import choose_seeding, draw_gantt, plan_schedule

    with errors():
        gantt = gantt and check_output(gantt, "--gantt")
        shot_list, prof, plans = prepare(RenderRequest(shots=shots, profile=profile, seeding=seeding.value,
                                                       strategy=strategy.value if strategy is not None else None))
        if seeding.value == "auto":
            chosen, why = choose_seeding(prof, [gpu_memory] * gpus if gpu_memory is not None else None)
            if chosen != plans[0].seeding:
                plans = plan_shot_list(shot_list, prof, chosen)
        else:
            why = f"{seeding.value} seeding, as asked"
        memory = estimate(prof, model_folder(prof), gpu_memory)
        peak = {**(memory["peak_gb"] if memory else {}), **prof.memory_gb}.get(plans[0].seeding)  # as profile_peaks
        schedule = plan_schedule(plans, gpus, peak_memory_gb=peak)
        typer.echo(json.dumps(plan_summary(shots, prof, plans, why, schedule, memory), indent=2) if as_json
                   else "\n".join(map(printable, plan_lines(shots, prof, plans, why, schedule, gpus))))
        if gantt is not None:
            typer.echo(printable(f"wrote {draw_gantt(schedule, gantt)}"), err=as_json)


@app.command(short_help="Write an sbatch script: a SLURM array that renders one folder together.")
def slurm(
    shots: ShotsArg,
    array: Annotated[int, typer.Option("--array", min=1, metavar="N", help="Array tasks (cooperating workers).")],
    gpus_per_task: Annotated[int, typer.Option("--gpus-per-task", min=0, metavar="N",
                                               help="GPUs per array task; 0 for a CPU cluster.")] = 1,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", min=1, metavar="N",
                                                         show_default="the cluster's")] = None,
    mem: Annotated[Optional[str], typer.Option("--mem", metavar="SIZE", show_default="the cluster's",
                                               help="Memory per array task, e.g. 64G.")] = None,
    time_limit: Annotated[str, typer.Option("--time", metavar="D-HH:MM:SS", help="Wall time per array task.")] = "24:00:00",
    partition: Annotated[Optional[str], typer.Option("--partition", show_default="the cluster's")] = None,
    account: Annotated[Optional[str], typer.Option("--account", show_default="yours")] = None,
    qos: Annotated[Optional[str], typer.Option("--qos", show_default="the cluster's")] = None,
    sbatch_args: Annotated[Optional[list[str]], typer.Option(
        "--sbatch-arg", metavar="--NAME=VALUE", show_default="none", help="Any other sbatch option; repeatable.")] = None,
    out: OutOpt = None,
    profile: ProfileOpt = None,
    seeding: SeedingOpt = Seeding.auto,
    model_path: Annotated[Optional[str], typer.Option("--model-path", metavar="FOLDER",
                                                      show_default="the profile's model.path")] = None,
    script: Annotated[Optional[Path], typer.Option("--script", metavar="PATH", show_default="<out>.sbatch")] = None,
) -> None:
    """Write a ready sbatch script: an array of tasks that all run the same `mmpl render` on one
    render folder and cooperate. It runs this Python, so it works from any shell. Pre-emption (USR1,
    sent 120 s before the time limit) stops a task cleanly and requeues it; `scancel` ends it."""
    from mmpl_cli.request import RenderRequest, prepare
    from mmpl_cli.slurm import Resources, write_script

    request = RenderRequest(shots=shots, out=out, profile=profile, seeding=seeding.value, model_path=model_path)
    res = Resources(array, gpus_per_task, cpus_per_task, mem, time_limit, partition, account, qos, tuple(sbatch_args or ()))
    with errors():
        folder = request.out_dir(prepare(request)[0].name)
        script = write_script(request, folder, res, script)
    typer.echo(f"wrote {script}\nsubmit it with:  sbatch {shlex.quote(str(script))}\n"
               f"watch it with:   mmpl status {shlex.quote(str(folder))}")


@app.command(short_help="Check Python, torch, GPUs, ffmpeg and every profile's weights.")
def doctor(
    profiles: Annotated[Optional[list[str]], typer.Option(
        "--profile", metavar="NAME|YAML", show_default="every shipped profile",
        help="Check this profile; repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Report Python, torch, diffusers, GPUs and their free memory, ffmpeg, flash-attn, and for every
    profile whether its weights are present (and if not, what is missing and where it was looked for).

    Exit code 1 when ffmpeg or the embedded default model is missing, else 0.
    """
    from mmpl_cli.doctor import collect, healthy, render_text

    report = collect(profiles)
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(render_text(report)))
    if not healthy(report):
        raise typer.Exit(EXIT_FAILURE)


@app.command("eval", short_help="Measure colour drift, join quality and flicker of MP4s.")
def eval_videos(
    videos: Annotated[list[Path], typer.Argument(help="MP4 files to measure.", metavar="VIDEO...")],
    segments_from: Annotated[Optional[Path], typer.Option(
        "--segments-from", metavar="FOLDER", help="The render folder of the videos: also measure at segment "
                                                  "joins and at planning-to-content edges.")] = None,
    as_json: JsonOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="PNG", help="Draw the per-second drift curves.")] = None,
) -> None:
    """Measure colour drift: hue-histogram L1 distance and correlation between the first and the last
    frame (MMPL paper, Table 5), across every segment join and planning-to-content edge (Tables 13
    and 14, with --segments-from), frame-to-frame flicker, and the drift at every second."""
    from mmpl_cli.evaluate import evaluate_video, format_table, plot_drift, to_json

    with errors():  # an unwritable --plot is refused before any video is read
        plot = plot and check_output(plot, "--plot")
        results = [evaluate_video(v, segments_from) for v in videos]
        typer.echo(to_json(results) if as_json else format_table(results))
        if plot is not None:
            typer.echo(printable(f"wrote {plot_drift(results, plot)}"), err=as_json)


@app.command(short_help="Fine-tune a Wan-architecture model with the MMPL recipe (resumable).")
def train(
    config: Annotated[Path, typer.Argument(help="The training config YAML (see examples/train-tiny.yaml).",
                                           show_default=False, metavar="CONFIG")],
    max_minutes: Annotated[Optional[float], typer.Option(
        "--max-minutes", min=0.0, metavar="MINUTES", show_default="no limit",
        help="Stop (with a checkpoint) after this many minutes; rerun to go on.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda.",
                                                  show_default="the config's")] = None,
    prepare: Annotated[bool, typer.Option("--prepare", help="Encode the clip pool (latents and caption embeddings) "
                                                            "into the data cache, resumably, and stop.")] = False,
    estimate: Annotated[Optional[int], typer.Option("--estimate", min=1, metavar="PROCESSES", show_default="off", help=
                                                    "Print the memory each of this many processes needs, and stop.")] = None,
    memory_gb: Annotated[Optional[float], typer.Option("--memory-gb", min=0.1, metavar="GB", show_default="the GPU's",
                                                       help="Device memory per process that training must fit.")] = None,
) -> None:
    """Train a Wan-architecture model with the MMPL recipe (teacher forcing on the render's groups), stage
    by stage; after a kill or --max-minutes the same command resumes. The model is the Diffusers folder
    <out>/model. `accelerate launch -m mmpl_cli train CONFIG` (or torchrun) trains data-parallel."""
    from mmpl_cli.progress import TrainProgress
    from mmpl_cli.train import command

    with errors():
        said = command(config, TrainProgress, max_minutes, device, prepare, estimate, memory_gb)
    typer.echo(said or "", nl=bool(said))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    finally:
        launch.exiting()
