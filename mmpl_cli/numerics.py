"""The numeric environment of a render: what, besides its inputs, decides a task's bits.

On a CPU, several of torch's kernels (oneDNN convolutions, the BLAS products, some reductions)
split their work by the intra-op thread count, and the split changes the rounding. On the 2-core
development machine the tiny default's VAE decode differs between 1 and 5 threads (2.4e-7), a
transformer forward between 1 and 4 (2.4e-6); on another machine 1 and 2 threads already differed,
and the difference grows along a segment's chain of tasks (dev/LOG.md, 2026-12-01). torchrun and
accelerate set OMP_NUM_THREADS=1, a plain process takes every core, a user may set anything: so
the launcher would decide the bits.

It does not: every task of a render folder runs with one thread count, `cpu_threads`. The folder's
first worker records it (`.mmpl/numerics.json`, first writer wins, like the seeding decision), and
every later worker and resume applies it with `torch.set_num_threads`, whatever OMP_NUM_THREADS,
the launcher or the machine's core count says. A new folder gets MMPL_CPU_THREADS, default 1: one
thread costs a plain CPU render a little, while more threads than cores cost multi-worker renders
twice over, and one thread per worker with `--workers N` is the fastest way to use N cores, with
the same bits (benchmarks/threads.py; figures in benchmarks/README.md).

What is not controlled here, and so not promised: another CPU model (its instruction set picks other
kernels), another GPU model, another torch or diffusers version (oneDNN comes with torch). Those are
recorded too, and a worker that differs in any of them says so. A folder made before the record
existed gets it from the first worker that resumes it.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

from mmpl_cli.errors import InputError, Problem

THREADS_ENV = "MMPL_CPU_THREADS"
DEFAULT_CPU_THREADS = 1
MAX_CPU_THREADS = 1024


def requested_threads(env: dict[str, str] | None = None) -> int:
    """The thread count a new render folder records: MMPL_CPU_THREADS, or 1 (raises InputError)."""
    raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_CPU_THREADS
    if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= MAX_CPU_THREADS:
        raise InputError(Problem("", None, THREADS_ENV, f"expected a whole number from 1 to {MAX_CPU_THREADS}, found {raw!r}",
                                 "unset it to use the default, 1 thread per worker"))
    return int(raw)


def usable_cores() -> int:
    """CPU cores this process may run on (a SLURM or cgroup CPU set counts, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """What this worker would record: the thread count to use, and what it cannot control."""
    import torch

    from importlib.metadata import version  # not `import diffusers`: seconds of imports for a string

    device = torch.device(device)
    here = {"cpu_threads": requested_threads(), "device_type": device.type, "cpu": _cpu_model(),
            "torch": torch.__version__, "diffusers": version("diffusers")}
    if device.type == "cuda":
        here["gpu"] = torch.cuda.get_device_name(device)
    return here


def check_record(record, path) -> dict:
    """A numerics record read back from a render folder (untrusted): its shape, or InputError."""
    threads = record.get("cpu_threads") if isinstance(record, dict) else None
    if type(threads) is not int or not 1 <= threads <= MAX_CPU_THREADS:
        raise InputError(Problem(str(path), None, "cpu_threads",
                                 f"expected a whole number from 1 to {MAX_CPU_THREADS}, found {threads!r}",
                                 "the render folder was altered; restore the file, or run with --restart"))
    return record


def differences(recorded: dict, here: dict) -> list[str]:
    """What differs between the folder's record and this worker, beyond the thread count it applies."""
    return [f"{key} {here.get(key)!r} (the folder's first worker: {recorded.get(key)!r})"
            for key in ("device_type", "gpu", "cpu", "torch", "diffusers") if recorded.get(key) != here.get(key)]


@contextlib.contextmanager
def applied(cpu_threads: int) -> Iterator[None]:
    """Run with torch's intra-op thread count set to `cpu_threads`, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def oversubscription(cpu_threads: int, workers_here: int) -> str | None:
    """A warning when the workers on this machine would run more threads than it has cores."""
    cores = usable_cores()
    if cpu_threads * workers_here <= cores:
        return None
    return (f"{workers_here} worker(s) x {cpu_threads} thread(s) on {cores} core(s): threads will wait for each "
            f"other (set {THREADS_ENV} lower for a new render folder, or start fewer workers)")
