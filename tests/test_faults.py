"""Faults at the wrong moment: a claim the disk refuses, and two shot lists on one render folder.

A render folder belongs to one shot list: two shot lists that both have a shot `intro`, rendered
into one folder one after the other or at the same moment, never make one video for two requests.
The second is refused (exit 2, naming --out and the owner) and the folder is left as it was; the
same file edited, or its unchanged copy elsewhere, is the same owner; --restart hands it over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from test_limits import listing

SHOTS = "version: 1\ndefaults: {steps: 2, seed: 3}\nshots:\n  - {id: intro, prompt: \"%s\", duration: 1}\n"


@pytest.mark.slow
def test_a_second_shot_list_is_refused_and_the_first_keeps_its_folder(tmp_path):
    a, b, copy = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "elsewhere" / "a.yaml"
    a.write_text(SHOTS % "a red ball")
    b.write_text(SHOTS % "a blue cube")
    out = tmp_path / "out"
    assert run_cli("render", str(a), "--out", str(out)).returncode == 0
    before = listing(tmp_path)
    proc = run_cli("render", str(b), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out: this render folder belongs to the shot list {a}; {b} cannot render into it" in proc.stderr
    assert listing(tmp_path) == before
    copy.parent.mkdir()
    copy.write_text(a.read_text())  # the same list moved or copied: same owner, nothing to compute
    proc = run_cli("render", str(copy), "--out", str(out))
    assert proc.returncode == 0 and "intro/s000/plan done" not in proc.stdout, proc.stderr
    a.write_text(SHOTS % "a red ball, slowly")  # the owner edited: renders again
    assert run_cli("render", str(a), "--out", str(out)).returncode == 0
    proc = run_cli("render", str(b), "--out", str(out), "--restart")  # handed over explicitly
    assert proc.returncode == 0, proc.stderr
    assert run_cli("render", str(a), "--out", str(out)).returncode == 2
    proc = run_cli("slurm", str(a), "--array", "2", "--out", str(out))  # refused before it queues anything
    assert proc.returncode == 2 and f"belongs to the shot list {b}" in proc.stderr
    assert not (tmp_path / "out.sbatch").exists()
    (out / ".mmpl/owner.json").unlink()  # a folder from before owners were recorded: its manifest names it
    proc = run_cli("render", str(a), "--out", str(out))
    assert proc.returncode == 2 and f"was rendered from the shot list {b}" in proc.stderr


@pytest.mark.slow
def test_two_shot_lists_started_at_once_one_renders_the_other_is_refused(tmp_path):
    lists = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for path, prompt in zip(lists, ("a red ball", "a blue cube")):
        path.write_text(SHOTS % prompt)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "mmpl_cli", "render", str(p), "--out", str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in lists]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = lists[[code for code, _ in results].index(0)]
    loser_message = next(err for code, err in results if code == 2)
    assert f"belongs to the shot list {winner}" in loser_message and "Traceback" not in loser_message
    assert json.loads((out / ".mmpl/manifest.json").read_text())["request"]["shots"] == str(winner)
    proc = run_cli("status", str(out), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["remaining"] == 0


def test_a_claim_that_cannot_be_written_leaves_no_empty_claim(tmp_path):
    """A disk that refuses the claim's bytes (here: a file-size limit of 0, EFBIG, in a real child
    process): the claim fails with the disk's message and leaves nothing behind, so the next worker
    claims the task at once instead of waiting out the claim timeout behind an empty claim."""
    script = (
        "import resource, signal, sys\n"
        "from mmpl_cli.claims import Claims\n"
        "from mmpl_cli.files import StoreError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "claims = Claims(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        "try:\n"
        "    claims.try_claim('s/s000/plan', 'a', timeout=3600)\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(7)\n")
    folder = tmp_path / "claims"
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert "cannot write" in proc.stdout and "s.s000-plan.claim.0" in proc.stdout
    assert [p.name for p in folder.rglob("*") if p.is_file()] == []  # no empty claim, no temporary file
    from mmpl_cli.claims import Claims

    assert Claims(folder).try_claim("s/s000/plan", "b", timeout=3600) is not None  # at once: nothing to wait out
