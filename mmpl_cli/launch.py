"""How this process takes part in a render: which worker it is, on which device, which workers it
starts, and which signals it forwards. Reads the environment torchrun / accelerate launch and SLURM set.

* torchrun / accelerate launch (RANK, LOCAL_RANK, WORLD_SIZE): this process is one worker; its
  local rank picks its GPU (cuda:LOCAL_RANK), or it runs on the CPU when there is none;
* a SLURM array task (SLURM_ARRAY_TASK_ID), or a plain `mmpl render`: one worker per visible GPU,
  or `--workers N` on the CPU; with more than one, this process starts them as child processes
  (`--as-worker`), each on GPU i of the visible ones, and forwards the signals it gets to them.

However it was launched, a worker runs its tasks with the render folder's CPU thread count
(numerics.py), not with the OMP_NUM_THREADS its launcher set: the bits must not depend on it.
Every worker runs the same render against the same folder; they cooperate through its claims.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mmpl_cli.control import Interrupted, StopFlag
from mmpl_cli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, InputError, MMPLError, Problem
from mmpl_cli.numerics import oversubscription

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # each stops a render cleanly (exit 3)


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


@dataclass(frozen=True)
class Role:
    """What this process does in the render."""

    launch: Launch
    name: str  # its worker name (or, when it starts workers, their names' prefix)
    workers: int  # worker processes it runs: 1 is itself; more are child processes
    team: int  # workers expected on the whole render: task priorities are tuned for that many
    device: str  # the device it renders on ("auto" resolved to a GPU where one is its own)
    as_worker: bool = False  # started by another mmpl process

    @property
    def log_prefix(self) -> str | None:
        """Workers, launcher ranks and array tasks prefix their log lines with their name."""
        return self.name if self.launch.mode != "plain" or self.as_worker else None


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _own_gpu(device: str, index: int) -> str:
    """`auto` with GPUs visible: the index-th one (round robin); anything else as asked."""
    if device != "auto":
        return device
    gpus = _gpus()
    return f"cuda:{index % gpus}" if gpus else device


def role(device: str, workers: int | None, as_worker: str | None, threads: int,
         warn: Callable[[str], None], env: dict[str, str] | None = None) -> Role:
    """Who this process is: a worker started by another mmpl process, a torchrun / accelerate rank,
    or the process a user (or SLURM) started, which runs `--workers` (default: one per GPU) workers."""
    env = dict(os.environ if env is None else env)
    launch = detect(env)
    if as_worker is not None:
        index = int(env.get("MMPL_WORKER_INDEX", "0"))
        return Role(launch, as_worker, 1, int(env.get("MMPL_WORKERS", "1")), _own_gpu(device, index), True)
    if launch.mode == "distributed":
        if launch.local_rank == 0 and (warning := oversubscription(threads, launch.local_world_size or 1)):
            warn(warning)
        return Role(launch, launch.name, 1, launch.team, _own_gpu(device, launch.local_rank))
    count = workers or max(1, _gpus())  # one per GPU: only then does this process need torch
    if count > 1 and (warning := oversubscription(threads, count)):
        warn(warning)
    return Role(launch, launch.name, count, count * launch.team, device)


def check_restart(role: Role, restart: bool) -> None:
    """--restart erases the folder's work: only a lone process the user started may do that."""
    if restart and role.launch.mode != "plain" and not role.as_worker:
        raise InputError(Problem("", None, "--restart",
                                 f"--restart under {role.launch.mode} would let workers erase each other's work",
                                 "run `mmpl render --restart` once on its own, or delete the folder"))


# -- signals ------------------------------------------------------------------------------------
#
# Installed before anything heavy is imported (mmpl_cli/__main__.py), so a signal at once stops
# cleanly too. The first signal sets STOP and is passed on to the workers this process started;
# inside an interruptible section (validation, a command's own work) it also raises Interrupted at
# once, elsewhere (a render's run, where the runtime checks STOP between denoising steps) it waits for
# that check. A second signal ends the process at once, quietly: every write is atomic.

STOP = StopFlag()
CHILDREN: list[subprocess.Popen] = []
_interruptible = False


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    for child in CHILDREN:
        try:
            child.send_signal(signum)
        except OSError:
            pass
    if STOP.reason is not None:
        os.write(2, f"mmpl: {name} again: stopping at once; finished tasks are kept\n".encode())
        os._exit(EXIT_INTERRUPTED)
    STOP.request(name)
    if _interruptible:
        raise Interrupted(f"stopped by {name}")
    os.write(2, f"mmpl: {name} received, stopping after the current step\n".encode())


def install_signal_handlers() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def exiting() -> None:
    """The process ends: Python drops its handlers while it shuts down, so a late signal is ignored
    instead; and the collector's last full pass over the heap (0.6 s of CPU once torch is imported,
    while other workers still run) is spared by freezing it: exit frees the memory anyway."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    import gc

    gc.freeze()


@contextmanager
def interruptible(yes: bool = True) -> Iterator[None]:
    """Within: a first signal raises Interrupted at once (yes), or only sets STOP (no). A signal
    that came before stops here."""
    global _interruptible
    before, _interruptible = _interruptible, yes
    try:
        STOP.check()
        yield
    finally:
        _interruptible = before


def run_workers(request, role: Role, claim_timeout: float, threads: int) -> None:
    """Start the role's workers as child processes of this render and wait for all of them. Each
    worker runs its tasks with the folder's thread count (numerics.py); OMP_NUM_THREADS only sizes
    its pool until then. A signal reaches them through forward_signals."""
    base = [sys.executable, "-m", "mmpl_cli", "render", *request.render_args(), "--claim-timeout", str(claim_timeout)]
    for i in range(role.workers):
        env = {**os.environ, "MMPL_WORKER_INDEX": str(i), "MMPL_WORKERS": str(role.team),
               "OMP_NUM_THREADS": str(threads)}
        CHILDREN.append(subprocess.Popen(base + ["--as-worker", f"{role.name}/w{i}"], env=env))
    codes = [child.wait() for child in CHILDREN]
    if EXIT_INTERRUPTED in codes:
        raise Interrupted("stopped")
    failed = [code for code in codes if code]
    if failed and all(code == EXIT_BAD_INPUT for code in failed):  # e.g. something planted in the folder: exit 2
        raise InputError(Problem(str(request.out), None, "--out", f"{len(failed)} of {len(codes)} workers stopped "
                                 "on bad input (their messages above say what to fix)"))
    if failed:
        raise MMPLError(f"{len(failed)} of {len(codes)} workers failed (their messages are above)")


def import_render() -> Callable:
    """runtime.render, imported (with torch) while the cyclic collector is paused, and what the import
    made frozen, as it lives as long as the process: torch's import otherwise runs three full
    collections of that heap, 0.2 s of each worker's CPU when eight start at once on two cores. The
    request's checked plans, made before, are frozen with it: render's start makes no full collection."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        from mmpl_cli.runtime import render
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return render


def run(checked, role: Role, restart: bool, claim_timeout: float, threads: int) -> list:
    """Render as this role: as the one worker, or by starting the role's workers and waiting for
    them. Returns the shots' videos."""
    check_restart(role, restart)
    if role.workers > 1:
        if restart:
            from mmpl_cli.store import RenderStore

            RenderStore(checked.out).restart([p.shot.id for p in checked.plans])
        run_workers(dataclasses.replace(checked.request, out=checked.out), role, claim_timeout, threads)
        STOP.check()
        return [checked.out / f"{p.shot.id}.mp4" for p in checked.plans]
    from mmpl_cli.control import Worker
    from mmpl_cli.progress import render_progress

    render = import_render()
    if role.device != checked.request.device:  # a worker's own GPU
        checked = dataclasses.replace(checked, request=dataclasses.replace(checked.request, device=role.device))
    progress = render_progress(role.log_prefix)
    try:
        return render(checked, progress, STOP, Worker(name=role.name, claim_timeout=claim_timeout, team=role.team))
    finally:
        progress.close()
