"""How this process takes part in a render: which worker it is, on which device, and whether it
starts more workers. Reads the environment that torchrun / accelerate launch and SLURM set.

* torchrun / accelerate launch (RANK, LOCAL_RANK, WORLD_SIZE): this process is one worker; its
  local rank picks its GPU (cuda:LOCAL_RANK), or it runs on the CPU when there is none;
* a SLURM array task (SLURM_ARRAY_TASK_ID), or a plain `mmpl render`: one worker per visible GPU,
  or `--workers N` on the CPU; with more than one, this process starts them as child processes.

However it was launched, a worker runs its tasks with the render folder's CPU thread count
(numerics.py), not with the OMP_NUM_THREADS its launcher set: the bits must not depend on it.

Every worker runs the same render against the same folder; they cooperate through its claims.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    mode: str  # "distributed" | "slurm-array" | "plain"
    name: str  # worker name prefix, unique among cooperating processes
    local_rank: int | None = None
    local_world_size: int | None = None
    team: int = 1  # cooperating processes this launch knows of (world size, array tasks)


def detect(env: dict[str, str] | None = None) -> Launch:
    env = dict(os.environ if env is None else env)
    host = socket.gethostname().split(".")[0]
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        return Launch("distributed", f"rank{env.get('RANK', env['LOCAL_RANK'])}", int(env["LOCAL_RANK"]),
                      int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), int(env["WORLD_SIZE"]))
    if "SLURM_ARRAY_TASK_ID" in env:
        job = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "job"))
        return Launch("slurm-array", f"array{job}_{env['SLURM_ARRAY_TASK_ID']}@{host}",
                      team=int(env.get("SLURM_ARRAY_TASK_COUNT", "1")))
    return Launch("plain", f"{host}:{os.getpid()}")

