"""Shared fixtures: a tiny Wan-architecture model built with diffusers' real classes, and a CLI runner."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a render runs its tasks on one thread (numerics.py), so one
    process leaves the second of CI's two cores idle. The whole suite takes three processes: the
    SLURM tests wait about two minutes for SLURM's requeue delay, which the third fills (887-898 s
    against about 950 s with two). A selection (-m, -k) takes two: their start-up (each builds the
    tiny model) costs more than a third process gains (`-m "not slow"`: 39 s with two, 53 s with three)."""
    return 2 if config.getoption("markexpr") or config.getoption("keyword") else 3
os.environ.pop("MMPL_CPU_THREADS", None)  # the tests assume a new render folder's default thread count

# The files that took longest in a suite run (2026-12-02, three processes on two cores), longest
# first. pytest-xdist hands whole files out in collection order (pyproject: loadfile, no
# reordering by test count, which started these last), so starting them first keeps the run from
# ending with one process still on a long file while the others are idle.
LONGEST_FILES = ["test_resume.py", "test_memory.py", "test_device.py", "test_workers.py", "test_train_scale.py",
                 "test_slurm.py", "test_real_width.py", "test_default_model.py", "test_render.py", "test_distilled.py",
                 "test_faults.py", "test_tampered.py", "test_train.py", "test_scale.py"]


def pytest_sessionstart(session) -> None:
    """Models run inside a test process on one thread: three processes share CI's two cores, and
    torch's default of a thread per core made them wait on one another (renders run in subprocesses
    with the folder's own thread count, one unless a test sets it)."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def shared(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built once for all the run's pytest-xdist processes: the first to
    ask builds it (`build(folder)`) under a lock, the others wait for it and reuse it (before, each
    process built its own real-width models and reference render).
    A build that failed fails the others at once. Tests read these folders; one that changes them
    copies them first."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # an xdist process: the run's own base folder is shared by its processes
        root = root.parent
    folder, done, failed = (root / f"shared-{name}{end}" for end in ("", ".done", ".failed"))
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"building the shared {name} failed in another process: {failed.read_text()}")
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}"[:2000])
                raise
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mmpl_cli.tiny import build_tiny_model

    return shared(tmp_path_factory, "tiny-model", lambda folder: build_tiny_model(folder, seed=1234))


@pytest.fixture(scope="session")
def backend(tiny_model_dir):
    from mmpl_cli.wan import WanBackend

    return WanBackend.from_folder(tiny_model_dir, max_sequence_length=32)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m mmpl_cli ...` as a user would, in a real subprocess (env: None unsets a variable)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MMPL_DEBUG", None)
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "mmpl_cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


_LAUNCHER = """
import os, resource, subprocess, sys
cap, report = int(sys.argv[1]), sys.argv[2]
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
child = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(child.pid, 0)
open(report, "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*args: str, address_space: int | None = None, timeout: float = 600):
    """run_cli, also returning the process's peak resident memory in MB, optionally under an
    address-space cap (RLIMIT_AS) that a larger allocation fails against. A small launcher starts
    it: a child forked from this process (the tests hold models) would report this process's
    resident memory as its own peak (Linux keeps the pre-exec high-water mark)."""
    import tempfile

    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1"}.items() if k != "MMPL_DEBUG"}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "maxrss"
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, str(address_space or 0), str(report),
                               sys.executable, "-m", "mmpl_cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        return done, int(report.read_text()) / 1024


# A 2-segment shot that the resume and worker tests render, interrupt and compare.
SHOTS = """version: 1
defaults: {steps: 6, seed: 21}
shots:
  - {id: k, prompt: "a lighthouse in a storm", duration: 9}
"""


def render_here(shots: Path, out: Path, model_dir: Path, device: str = "cpu", progress=None, storyboard=False,
                **worker) -> list[Path]:
    """One worker rendering in this process (so a test can watch its calls, or give it a stand-in
    device), as `mmpl render` would; returns the videos."""
    from mmpl_cli import runtime
    from mmpl_cli.control import StopFlag, Worker
    from mmpl_cli.progress import Progress
    from mmpl_cli.request import RenderRequest, check

    checked = check(RenderRequest(shots=shots, out=out, model_path=str(model_dir), device=device, storyboard=storyboard))
    return runtime.render(checked, progress or Progress(), StopFlag(), Worker(poll=0.05, **worker))


def events(out: Path) -> list[dict]:
    """Every worker's events of a render folder, merged in time order (one file per process)."""
    from mmpl_cli.store import RenderStore

    return RenderStore(out).event_log.read()


def videos(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.mp4"))}


@pytest.fixture(scope="session")
def shots_file(tmp_path_factory) -> Path:
    """SHOTS in a file, one path for every process (a render folder records its shot list's path)."""
    return shared(tmp_path_factory, "shots", lambda folder: (folder / "shots.yaml").write_text(SHOTS)) / "shots.yaml"


@pytest.fixture(scope="session")
def reference_dir(shots_file, tiny_model_dir, tmp_path_factory) -> Path:
    """The render folder of one uninterrupted single-worker render of SHOTS (copy it; don't change it),
    launched with OMP_NUM_THREADS unset (torch's default, every core); the worker tests launch with
    other settings, and every one of them must run its tasks with the folder's recorded count."""
    def build(out: Path) -> None:
        proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                       env={"OMP_NUM_THREADS": None, "MMPL_CPU_THREADS": None})
        assert proc.returncode == 0, proc.stderr

    return shared(tmp_path_factory, "reference", build)


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict[str, bytes]:
    return videos(reference_dir)


# The released architectures at their real widths with their depth cut (mmpl_cli.tiny.build_wan_model),
# shared by the real-width render tests and the memory model's tests.


@pytest.fixture(scope="session")
def wan13(tmp_path_factory) -> Path:
    from mmpl_cli.tiny import build_wan_model

    return shared(tmp_path_factory, "wan13", lambda folder: build_wan_model(folder, "wan2.1-1.3b", num_layers=2, seed=11))


@pytest.fixture(scope="session")
def wan14(wan13, tmp_path_factory) -> Path:
    """The 14B transformer (one block) beside the same text encoder and VAE."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.memory import WAN_TRANSFORMERS

    def build(dest: Path) -> None:
        shutil.copytree(wan13, dest, ignore=shutil.ignore_patterns("transformer"), dirs_exist_ok=True)
        import torch

        torch.manual_seed(14)
        WanTransformer3DModel(**{**WAN_TRANSFORMERS["wan2.1-14b"], "num_layers": 1}).save_pretrained(
            dest / "transformer", safe_serialization=True)

    return shared(tmp_path_factory, "wan14", build)
