"""Shared fixtures: a tiny Wan-architecture model built with diffusers' real classes, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mmpl_cli.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=1234)


@pytest.fixture(scope="session")
def backend(tiny_model_dir):
    from mmpl_cli.wan import WanBackend

    return WanBackend.from_folder(tiny_model_dir, max_sequence_length=32)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m mmpl_cli ...` as a user would, in a real subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MMPL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mmpl_cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
