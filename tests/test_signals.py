"""Signals at every moment: right after start, during validation, during model loading, and a second
one while mmpl is already stopping. Each ends with exit code 3 and no traceback. (A signal in the
first ~50 ms, while the Python interpreter itself starts, comes before any handler can exist.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_resume import wait_for_start


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmpl_cli", *args], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _many_shots(tmp_path: Path, count: int = 30000) -> Path:
    """A valid shot list that takes a while to validate and plan."""
    path = tmp_path / "many.yaml"
    path.write_text("version: 1\ndefaults: {steps: 2, seed: 1}\nshots:\n" + "".join(
        f'  - {{id: s{i}, prompt: "a small red circle moving down on a cyan background", duration: 1}}\n'
        for i in range(count)))
    return path


def _ends_with_3(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_at_start_during_validation_and_during_loading_exits_3(sig, shots_file, tiny_model_dir, tmp_path):
    render = ["render", str(shots_file), "--model-path", str(tiny_model_dir)]
    # 0.1 s after start: imports are still under way
    proc = _start(render + ["--out", str(tmp_path / "a")])
    time.sleep(0.1)
    proc.send_signal(sig)
    assert f"stopped by {sig.name}" in _ends_with_3(proc)
    # during validation of a long shot list: nothing is written
    proc = _start(["render", str(_many_shots(tmp_path)), "--out", str(tmp_path / "b")])
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(sig)
    _ends_with_3(proc)
    assert not (tmp_path / "b").exists()
    # during model loading: the first task's claim is taken, the model is being read
    proc = _start(render + ["--out", str(tmp_path / "c")])
    out = proc.stdout
    for line in out:
        if "loading" in line:
            break
    proc.send_signal(sig)
    err = _ends_with_3(proc)
    assert "resume with:" in err


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.0])
def test_a_second_sigterm_at_any_delay_never_prints_a_traceback(delay, shots_file, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(["render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir)])
    wait_for_start(out, "k/s000/plan", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _ends_with_3(proc)
