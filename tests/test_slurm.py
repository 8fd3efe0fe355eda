"""`mmpl slurm` scripts: what they hold, what they refuse, and how they run on a real one-node SLURM
cluster (.ci/slurm-up starts one; CI sets MMPL_REQUIRE_SLURM=1, so there the cluster tests fail
instead of skipping when it is not up)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, videos
from test_workers import computed_once, same_bits_as_reference

HOSTILE = ["new\nline", "quo'te", 'dou"ble', "$(touch PWNED)", "sp ace", "back`tick`"]
BARE_PATH = "/usr/bin:/bin"  # a submitting shell without mmpl or its virtual environment
REQUEUE_DELAY_S = 120  # SLURM holds a requeued batch job this long (Reason=BeginTime; measured: 121 s)


def test_sbatch_script(tmp_path, shots_file):
    script = tmp_path / "job.sbatch"
    proc = run_cli("slurm", str(shots_file), "--array", "4", "--gpus-per-task", "2", "--out", str(tmp_path / "r"),
                   "--script", str(script), "--partition", "gpu", "--cpus-per-task", "8", "--mem", "64G",
                   "--account", "proj1", "--qos", "high", "--sbatch-arg=--constraint=a100", "--sbatch-arg=--exclusive")
    assert proc.returncode == 0, proc.stderr
    assert f"sbatch {script}" in proc.stdout
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for expected in ("--array=0-3", "--gpus-per-task=2", "--signal=B:USR1@120", "--requeue", "--partition=gpu",
                     "--cpus-per-task=8", "--mem=64G", "--account=proj1", "--qos=high", "--constraint=a100",
                     "--exclusive", f"--output={tmp_path / 'r'}.logs/%A_%a.out"):
        assert f"#SBATCH {expected}" in directives
    assert (tmp_path / "r.logs").is_dir()  # SLURM opens --output before the script runs
    assert f"{sys.executable} -m mmpl_cli render {shots_file} --out {tmp_path / 'r'}" in text
    assert "kill -USR1 $child" in text and "scontrol requeue" in text


def test_cpu_cluster_and_one_script_per_out(tmp_path, shots_file):
    for out in ("run.v2", "run.v3"):
        proc = run_cli("slurm", str(shots_file), "--array", "1", "--gpus-per-task", "0", "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stderr
    scripts = sorted(p.name for p in tmp_path.glob("*.sbatch"))
    assert scripts == ["run.v2.sbatch", "run.v3.sbatch"]
    assert "gpus-per-task" not in (tmp_path / "run.v2.sbatch").read_text()


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_are_quoted_and_inert_or_refused(value, tmp_path, shots_file):
    # in the shot list's file name: the script quotes it, and the shell reads back exactly that path
    hostile_shots = tmp_path / f"shots {value}.yaml"
    hostile_shots.write_text(shots_file.read_text())
    script = tmp_path / "a.sbatch"
    proc = run_cli("slurm", str(hostile_shots), "--array", "1", "--out", str(tmp_path / "safe"), "--script", str(script))
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    command = _command(text).replace(f"{shlex.quote(sys.executable)} -m mmpl_cli render", "printf '%s\\0'", 1)
    echoed = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
    assert echoed.stdout.split("\0")[0] == str(hostile_shots)  # the path, whole: nothing ran
    assert not (tmp_path / "PWNED").exists()
    assert not any(value in line for line in text.splitlines() if line.startswith("#SBATCH"))
    # in --out, --partition and --time, which go into #SBATCH lines: refused, nothing written
    for option, bad in (("--out", str(tmp_path / f"o{value}")), ("--partition", value), ("--time", value)):
        args = ["slurm", str(shots_file), "--array", "1", "--script", str(tmp_path / "b.sbatch"), option, bad]
        if option != "--out":
            args += ["--out", str(tmp_path / "safe2")]
        proc = run_cli(*args)
        assert proc.returncode == 2, (option, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and option in proc.stderr
        assert not (tmp_path / "b.sbatch").exists() and not (tmp_path / "safe2.logs").exists()


def _command(text: str) -> str:
    """The script's mmpl command, as the shell will read it (it may span lines inside quotes)."""
    start = text.index(f"{shlex.quote(sys.executable)} -m mmpl_cli render")
    return text[start:text.index(" &\nchild=$!", start)]


# -- on a real cluster ---------------------------------------------------------------------------


def _cluster() -> None:
    why = None
    if shutil.which("sbatch") is None:
        why = "sbatch is not installed"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or not re.search(r"idle|mixed|allocated", proc.stdout):
            why = f"no SLURM node is up ({(proc.stderr or proc.stdout).strip()[:200]})"
    if why and os.environ.get("MMPL_REQUIRE_SLURM") == "1":
        pytest.fail(f"MMPL_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(f"{why}; `.ci/slurm-up` (as root) starts a one-node cluster")


def _sbatch(script: Path) -> str:
    """Submit from a shell that has no mmpl on PATH, in another directory."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], cwd="/", capture_output=True, text=True, timeout=60,
                          env={"PATH": BARE_PATH, "HOME": os.environ.get("HOME", "/root")})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _queued(job: str) -> bool:
    proc = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
    return bool(proc.stdout.strip())


def _wait_gone(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while _queued(job):
        assert time.time() < deadline, subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        time.sleep(2)


def _job(job: str) -> dict[str, str]:
    """`scontrol show job` of the job (its first array task) as key -> value."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0])) if text.strip() else {}


def _slurm_script(shots_file, tiny_model_dir, out: Path, array: int) -> Path:
    proc = run_cli("slurm", str(shots_file), "--array", str(array), "--gpus-per-task", "0", "--cpus-per-task", "1",
                   "--out", str(out), "--model-path", str(tiny_model_dir), "--time", "30")
    assert proc.returncode == 0, proc.stderr
    return out.with_name(out.name + ".sbatch")


def _logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted(out.with_name(out.name + ".logs").glob("*.out")))


@pytest.mark.slow
def test_an_array_from_mmpl_slurm_renders_the_same_bits_on_a_real_cluster(shots_file, tiny_model_dir, reference_dir,
                                                                          tmp_path):
    _cluster()
    out = tmp_path / "array"
    job = _sbatch(_slurm_script(shots_file, tiny_model_dir, out, array=2))
    _wait_gone(job, timeout=600)
    logs = _logs(out)
    assert videos(out) == videos(reference_dir), logs
    same_bits_as_reference(out, reference_dir)
    computed_once(out)
    assert len(list(out.with_name(out.name + ".logs").glob(f"{job}_*.out"))) == 2, logs


@pytest.mark.slow
def test_preemption_requeues_and_resumes_and_a_cancel_cancels(shots_file, tiny_model_dir, reference_dir, tmp_path):
    _cluster()
    preempted, cancelled = tmp_path / "preempted", tmp_path / "cancelled"
    jobs = {out: _sbatch(_slurm_script(shots_file, tiny_model_dir, out, array=1)) for out in (preempted, cancelled)}
    for out in (preempted, cancelled):  # both running, a task under way
        deadline = time.time() + 300
        while not list((out / ".mmpl" / "tasks").rglob("*.safetensors")):
            assert time.time() < deadline, _logs(out)
            time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jobs[preempted]], check=True, timeout=30)
    subprocess.run(["scancel", jobs[cancelled]], check=True, timeout=30)
    cancelled_at = time.time()

    _wait_gone(jobs[preempted], timeout=900)  # stopped, requeued, resumed, finished
    logs = _logs(preempted)
    assert "stopped for pre-emption" in logs and "requeueing" in logs, logs
    assert int(_job(jobs[preempted]).get("Restarts", "0")) >= 1
    assert videos(preempted) == videos(reference_dir)
    same_bits_as_reference(preempted, reference_dir)
    computed_once(preempted)  # no finished task was computed again

    time.sleep(max(0.0, cancelled_at + REQUEUE_DELAY_S + 30 - time.time()))  # past the delay before a requeued job runs
    assert not _queued(jobs[cancelled])
    state = _job(jobs[cancelled])
    assert state.get("JobState") == "CANCELLED" and state.get("Restarts") == "0", state
    assert "requeueing" not in _logs(cancelled)
    assert len(videos(cancelled)) < len(videos(reference_dir))  # it stopped: the render is not finished
