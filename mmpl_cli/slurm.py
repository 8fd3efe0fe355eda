"""The sbatch script for a SLURM array render. Pure text: every array task runs the same
`mmpl render` on the same render folder, and the workers cooperate through its claims."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from mmpl_cli.request import RenderRequest


def sbatch_script(request: RenderRequest, folder: Path, array: int, gpus_per_task: int, time_limit: str,
                  partition: str | None) -> str:
    folder = Path(folder).resolve()
    # absolute paths: the job may start in another working directory
    absolute = dataclasses.replace(request, shots=Path(request.shots).resolve(), out=folder)
    command = ["mmpl", "render", *absolute.render_args()]
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=mmpl-{folder.name}",
        f"#SBATCH --array=0-{array - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --gpus-per-task={gpus_per_task}" if gpus_per_task else "#SBATCH --cpus-per-task=2",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=B:USR1@120",  # pre-emption warning: mmpl stops cleanly (exit 3)
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}.logs/%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "",
        "# Every array task runs the same command on the same render folder; finished tasks are kept",
        "# there, so a pre-empted or requeued task resumes where it stopped.",
        "set -uo pipefail",
        f"mkdir -p {shlex.quote(str(folder))}.logs",
        "# Run mmpl in the background so that bash can pass SLURM's USR1 on to it at once.",
        f"{shlex.join(command)} &",
        "child=$!",
        "trap 'kill -USR1 $child 2>/dev/null' USR1",
        "trap 'kill -TERM $child 2>/dev/null' TERM",
        "wait $child; code=$?",
        "while [ $code -gt 128 ] && kill -0 $child 2>/dev/null; do wait $child; code=$?; done",
        "if [ $code -eq 3 ]; then",
        '    echo "mmpl stopped for pre-emption; requeueing"',
        '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" 2>/dev/null || true',
        "fi",
        "exit $code",
        "",
    ]
    return "\n".join(lines)
