"""Shared fixtures: a tiny Wan-architecture model built with diffusers' real classes, and a CLI runner."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mmpl_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=1234)


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


def events(out: Path) -> list[dict]:
    """Every worker's events of a render folder, merged in time order (one file per process)."""
    from mmpl_cli.store import RenderStore

    return RenderStore(out).events()


def videos(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.mp4"))}


@pytest.fixture(scope="session")
def shots_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shots") / "shots.yaml"
    path.write_text(SHOTS)
    return path


@pytest.fixture(scope="session")
def reference_dir(shots_file, tiny_model_dir, tmp_path_factory) -> Path:
    """The render folder of one uninterrupted single-worker render of SHOTS (copy it; don't change it),
    launched with OMP_NUM_THREADS unset (torch's default, every core); the worker tests launch with
    other settings, and every one of them must run its tasks with the folder's recorded count."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"OMP_NUM_THREADS": None, "MMPL_CPU_THREADS": None})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict[str, bytes]:
    return videos(reference_dir)


# The released architectures at their real widths with their depth cut (mmpl_cli.tiny.build_wan_model),
# shared by the real-width render tests and the memory model's tests.


@pytest.fixture(scope="session")
def wan13(tmp_path_factory) -> Path:
    from mmpl_cli.tiny import build_wan_model

    return build_wan_model(tmp_path_factory.mktemp("wan13") / "model", "wan2.1-1.3b", num_layers=2, seed=11)


@pytest.fixture(scope="session")
def wan14(wan13, tmp_path_factory) -> Path:
    """The 14B transformer (one block) beside the same text encoder and VAE."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.memory import WAN_TRANSFORMERS

    dest = tmp_path_factory.mktemp("wan14") / "model"
    shutil.copytree(wan13, dest, ignore=shutil.ignore_patterns("transformer"))
    import torch

    torch.manual_seed(14)
    WanTransformer3DModel(**{**WAN_TRANSFORMERS["wan2.1-14b"], "num_layers": 1}).save_pretrained(
        dest / "transformer", safe_serialization=True)
    return dest
