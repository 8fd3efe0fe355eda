"""The sbatch script for a SLURM array render. Every array task runs the same `mmpl render` on the
same render folder, and the workers cooperate through its claims.

The script works wherever it is submitted from: it runs the Python that wrote it (`<python> -m
mmpl_cli`, so no `mmpl` on PATH is needed), with absolute paths, and logs into a folder that
`mmpl slurm` creates (SLURM opens `--output` before the script runs). Values that go into the
command are shell-quoted; values that go into `#SBATCH` lines, which sbatch reads without a shell,
must be plain words, or they are refused (exit 2) before anything is written.

Pre-emption and cancellation are told apart by the signal the batch shell gets: USR1 (SLURM sends
it 120 s before the time limit, from `--signal=B:USR1@120`, and `scancel --signal=USR1 --batch`
sends it for a pre-emption) stops mmpl and requeues the task, which resumes from the render folder;
TERM (a user's `scancel`) stops mmpl and ends the task.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.request import RenderRequest, check_owner
from mmpl_cli.shotlist import load_shot_list
from mmpl_cli.store import RenderStore

PREEMPT_SIGNAL = "USR1"
WARNING_SECONDS = 120  # how long before its time limit a task is told to stop

_WORD = re.compile(r"[A-Za-z0-9._,:=+/@-]+")  # what an #SBATCH value may be: no space, quote, $, % or newline
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+")  # minutes, [D-]HH:MM[:SS], D-HH
_MEM = re.compile(r"\d+[KMGT]?")


@dataclass(frozen=True)
class Resources:
    """What each array task asks SLURM for."""

    array: int
    gpus_per_task: int = 1
    cpus_per_task: int | None = None  # None: the cluster's default
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: tuple[str, ...] = ()  # more directives, each "--name=value" or "--flag"


def script_path(folder: Path) -> Path:
    """<out>.sbatch beside the render folder: one script per --out (`run.v2` -> `run.v2.sbatch`)."""
    return folder.with_name(folder.name + ".sbatch")


def log_folder(folder: Path) -> Path:
    return folder.with_name(folder.name + ".logs")


def check(folder: Path, res: Resources) -> None:
    """Refuse what cannot go into an #SBATCH line as it is (exit 2, nothing written)."""
    problems = []

    def need(ok: bool, field: str, value, expected: str) -> None:
        if not ok:
            problems.append(Problem("", None, field, f"expected {expected}, found {value!r}"))

    logs = str(log_folder(Path(folder).resolve()))
    need(_WORD.fullmatch(logs) is not None, "--out", str(folder),
         "a folder whose path has no spaces, quotes, $, % or newlines (its log folder goes into an #SBATCH line)")
    need(_TIME.fullmatch(res.time) is not None, "--time", res.time, "a SLURM time: MINUTES, [D-]HH:MM[:SS] or D-HH")
    need(res.mem is None or _MEM.fullmatch(res.mem) is not None, "--mem", res.mem, "a size such as 16G or 4000M")
    for field, value in (("--partition", res.partition), ("--account", res.account), ("--qos", res.qos)):
        need(value is None or _WORD.fullmatch(value) is not None, field, value, "a SLURM name (letters, digits, . _ - ,)")
    for value in res.extra:
        need(value.startswith("--") and _WORD.fullmatch(value) is not None, "--sbatch-arg", value,
             "one sbatch option as --name=value, without spaces or quotes")
    if problems:
        raise InputError(problems)


def sbatch_script(request: RenderRequest, folder: Path, res: Resources, python: str = sys.executable) -> str:
    folder = Path(folder).resolve()
    check(folder, res)
    # absolute paths and this Python: the job may start in another directory, with another PATH
    absolute = dataclasses.replace(request, shots=Path(request.shots).resolve(), out=folder)
    command = [python, "-m", "mmpl_cli", "render", *absolute.render_args()]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", folder.name)[:60]
    directives = [
        f"--job-name=mmpl-{name}",
        f"--array=0-{res.array - 1}",
        "--ntasks=1",
        *([f"--gpus-per-task={res.gpus_per_task}"] if res.gpus_per_task else []),
        *([f"--cpus-per-task={res.cpus_per_task}"] if res.cpus_per_task else []),
        *([f"--mem={res.mem}"] if res.mem else []),
        f"--time={res.time}",
        *([f"--partition={res.partition}"] if res.partition else []),
        *([f"--account={res.account}"] if res.account else []),
        *([f"--qos={res.qos}"] if res.qos else []),
        f"--signal=B:{PREEMPT_SIGNAL}@{WARNING_SECONDS}",
        "--requeue",
        "--open-mode=append",
        f"--output={log_folder(folder)}/%A_%a.out",
        *res.extra,
    ]
    task = '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'
    lines = [
        "#!/usr/bin/env bash",
        *(f"#SBATCH {d}" for d in directives),
        "",
        "# Every array task runs the same command on the same render folder; finished tasks are kept",
        "# there, so a requeued task resumes where it stopped. Written by `mmpl slurm`.",
        "set -uo pipefail",
        'reason=""',
        "# mmpl runs in the background so that bash can pass a signal on to it at once.",
        f"{shlex.join(command)} &",
        "child=$!",
        f"trap 'reason=pre-emption; kill -{PREEMPT_SIGNAL} $child 2>/dev/null' {PREEMPT_SIGNAL}",
        "trap 'reason=cancel; kill -TERM $child 2>/dev/null' TERM INT",
        "wait $child; code=$?",
        "while [ $code -gt 128 ] && kill -0 $child 2>/dev/null; do wait $child; code=$?; done",
        'if [ "$reason" = pre-emption ] && [ $code -ne 0 ]; then  # 3, or killed before its handlers were in place',
        f'    echo "mmpl: stopped for pre-emption or the time limit ({PREEMPT_SIGNAL}); requeueing {task}"',
        f"    scontrol requeue {task} || echo \"mmpl: the requeue failed; submit the script again to resume\"",
        'elif [ $code -eq 3 ]; then',
        '    echo "mmpl: stopped by ${reason:-a signal} (TERM: scancel, or SLURM ending the job); not requeued"',
        "fi",
        "exit $code",
        "",
    ]
    return "\n".join(lines)


def write_script(request: RenderRequest, folder: Path, res: Resources, script: Path | None = None) -> Path:
    """Write the script (default <out>.sbatch) and create its log folder; returns the script's path."""
    from mmpl_cli.files import check_output, disk_errors, write_atomic

    text = sbatch_script(request, folder, res)  # checks every value first: nothing written on bad input
    check_output(folder, "--out", folder=True)
    if Path(folder).exists():  # a folder another shot list owns: every array task would be refused in the queue
        check_owner(RenderStore(Path(folder)), load_shot_list(request.shots))
    script = check_output(Path(script) if script is not None else script_path(Path(folder).resolve()), "--script")
    logs = check_output(log_folder(Path(folder).resolve()), "--out", folder=True)
    with disk_errors(logs):
        logs.mkdir(parents=True, exist_ok=True)
    write_atomic(script, text)
    script.chmod(0o755)
    return script
