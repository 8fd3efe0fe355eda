"""Several workers on one render folder: torchrun, SLURM array tasks, a killed worker, sbatch."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, events, render_here, run_cli, videos
from mmpl_cli.claims import Claims
from mmpl_cli.store import RenderStore
from test_resume import status, wait_for_start

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def computed_once(out: Path) -> None:
    report = status(out)
    assert report["remaining"] == 0
    assert {t["id"]: t["computed"] for t in report["tasks"]} == {t["id"]: 1 for t in report["tasks"]}


def workers_of(out: Path) -> set[str]:
    return {e["worker"] for e in events(out) if e["event"] == "finished"}


def task_checksums(out: Path) -> dict[str, str]:
    """The checksum of every finished task's latents: the bits, before video encoding can hide them."""
    from safetensors import safe_open

    sums = {}
    for path in sorted((out / ".mmpl" / "tasks").rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            sums[str(path.relative_to(out))] = fh.metadata()["checksum"]
    return sums


def threads_used(out: Path) -> set[int]:
    """The intra-op thread counts the folder's tasks were computed with (from its event log)."""
    return {e["threads"] for e in events(out) if e["event"] == "finished"}


def same_bits_as_reference(out: Path, reference_dir: Path) -> None:
    """Videos and every task's latents equal the plain render's, and every task ran with the one
    thread count the folder recorded (1 unless MMPL_CPU_THREADS said otherwise when it was made):
    where a CPU happens to give equal bits for any thread count, this still sees the mechanism."""
    assert videos(out) == videos(reference_dir)
    assert task_checksums(out) == task_checksums(reference_dir)
    recorded = json.loads((out / ".mmpl" / "numerics.json").read_text())["cpu_threads"]
    assert threads_used(out) == threads_used(reference_dir) == {recorded} == {1}


def _render(shots_file, tiny_model_dir, out, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmpl_cli", "render", str(shots_file), "--out", str(out),
                             "--model-path", str(tiny_model_dir), *extra], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Every test below launches its workers with another OMP_NUM_THREADS than the plain reference render
# (launched with it unset). Each must run its tasks with the folder's recorded thread count (the
# event log says which) and give the reference's bits: on a CPU whose kernels round by thread count
# (the machine) the bits would differ without that; on one that does not (ours), the
# recorded count still shows the mechanism at work.


@pytest.mark.slow
def test_omp_num_threads_does_not_change_the_bits(shots_file, tiny_model_dir, reference_dir, tmp_path):
    """`OMP_NUM_THREADS=1 mmpl render` (the array tasks below run with 3)."""
    out = tmp_path / "out"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    same_bits_as_reference(out, reference_dir)


@pytest.mark.slow
def test_torchrun_two_ranks(shots_file, tiny_model_dir, reference_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", "29517", "-m", "mmpl_cli", "render",
                           str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # torchrun sets OMP_NUM_THREADS=1
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_bits_as_reference(out, reference_dir)
    computed_once(out)
    assert workers_of(out) == {"rank0", "rank1"}


@pytest.mark.slow
def test_the_readmes_accelerate_line_starts_two_ranks_on_a_cpu(shots_file, tiny_model_dir, reference_dir, tmp_path):
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("accelerate launch"))
    launcher = line.split(" -m mmpl_cli ")[0].split()
    assert launcher == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out = tmp_path / "out"
    proc = subprocess.run([accelerate, *launcher[1:], "--main_process_port", "29519", "-m", "mmpl_cli", "render",
                           str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_bits_as_reference(out, reference_dir)
    computed_once(out)
    assert workers_of(out) == {"rank0", "rank1"}


@pytest.mark.slow
def test_torchrun_killed_half_way_resumed_by_plain_render(shots_file, tiny_model_dir, reference_dir, tmp_path):
    """The resume command mmpl prints is a plain `mmpl render`, with the user's own thread settings:
    it must finish the torchrun render with the folder's thread count, not its own."""
    out = tmp_path / "out"
    import psutil  # accelerate's dependency

    job = subprocess.Popen([TORCHRUN, "--nproc-per-node", "2", "--master-port", "29518", "-m", "mmpl_cli", "render",
                            str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_start(out, "k/s001/plan", job)
    finally:  # the launcher and both ranks (torchrun starts each in a session of its own), as a node crash would
        for proc in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
            proc.kill()
        job.wait()
    assert status(out)["remaining"] > 0
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"OMP_NUM_THREADS": "2", "MMPL_CPU_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    same_bits_as_reference(out, reference_dir)
    assert status(out)["remaining"] == 0


@pytest.mark.slow
def test_two_slurm_array_tasks(shots_file, tiny_model_dir, reference_dir, tmp_path):
    out = tmp_path / "out"
    procs = [_render(shots_file, tiny_model_dir, out, {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": str(i),
                                                       "OMP_NUM_THREADS": "3"}) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    same_bits_as_reference(out, reference_dir)
    computed_once(out)
    assert len(workers_of(out)) == 2


@pytest.mark.slow
def test_plain_workers_option(shots_file, tiny_model_dir, reference_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    same_bits_as_reference(out, reference_dir)
    computed_once(out)


@pytest.mark.slow
def test_killed_worker_task_is_taken_over(shots_file, tiny_model_dir, reference_dir, tmp_path):
    out = tmp_path / "out"
    env = {"SLURM_ARRAY_JOB_ID": "9", "OMP_NUM_THREADS": "1"}

    def start(i):
        return _render(shots_file, tiny_model_dir, out, {**env, "SLURM_ARRAY_TASK_ID": str(i)}, "--claim-timeout", "3")

    victim = start(0)
    wait_for_start(out, "k/s000/decode", victim)  # the victim is alone until now: this task is its
    survivor = start(1)
    victim.kill()
    victim.wait()
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    same_bits_as_reference(out, reference_dir)
    report = status(out)
    assert report["remaining"] == 0
    assert all(t["computed"] == 1 for t in report["tasks"])
    # no claim and no worker's record is left: the survivor removes its own and the killed one's
    assert [p for p in (out / ".mmpl" / "claims").rglob("*") if not p.is_dir()] == []


@pytest.mark.slow
def test_a_new_folder_takes_mmpl_cpu_threads_and_bad_values_are_refused(shots_file, tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"MMPL_CPU_THREADS": "lots"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MMPL_CPU_THREADS: expected a whole number from 1 to 1024, found 'lots'" in proc.stderr
    assert not out.exists()
    out = tmp_path / "two"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir),
                   env={"MMPL_CPU_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / ".mmpl" / "numerics.json").read_text())["cpu_threads"] == 2
    assert threads_used(out) == {2}
    # a tampered record is named, not trusted
    (out / ".mmpl" / "numerics.json").write_text('{"cpu_threads": "all of them"}')
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "numerics.json: cpu_threads: expected a whole number from 1 to 1024, found 'all of them'" in proc.stderr


def test_stale_claims_are_taken_over_and_live_ones_respected(tmp_path):
    store = Claims(RenderStore(tmp_path).claims_folder)
    mine = store.try_claim("s/s000/plan", "a", timeout=60)
    assert mine is not None and store.holds(mine, "s/s000/plan")
    assert store.try_claim("s/s000/plan", "b", timeout=60) is None  # alive: its heartbeat is fresh
    # a worker on another machine that stopped answering: old heartbeat
    foreign = json.dumps({"worker": "far", "pid": 1, "host": "elsewhere", "time": 0})
    mine.write_text(foreign)
    os.utime(mine, (time.time() - 120, time.time() - 120))
    taken = store.try_claim("s/s000/plan", "b", timeout=60)
    assert taken is not None and taken.name.endswith(".claim.1")
    assert not store.holds(mine, "s/s000/plan") and store.holds(taken, "s/s000/plan")
    store.release(taken)
    assert store.try_claim("s/s000/plan", "c", timeout=60) is not None


def test_a_claim_of_a_dead_worker_here_is_taken_over_once_it_is_two_seconds_old(tmp_path):
    """claims.FRESH: a claim touched within the last two seconds counts as held without reading whose
    it is (with many workers nearly every ask meets one made a moment before); an older one whose
    process is gone from this machine is taken over at once, long before the claim timeout, and so
    is one whose time lies further ahead (a clock set back)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims = Claims(RenderStore(tmp_path).claims_folder)
    claims.folder.mkdir(parents=True)
    record = json.dumps({"worker": "gone", "pid": int(dead.stdout), "host": os.uname().nodename, "time": 0})
    for task, shift in (("s/s000/plan", -3), ("s/s001/plan", +30)):
        planted = claims.folder / (task.replace("/", ".", 1).replace("/", "-") + ".claim.0")
        planted.write_text(record)
        assert claims.try_claim(task, "b", timeout=60) is None  # just written: held
        os.utime(planted, (time.time() + shift, time.time() + shift))
        taken = claims.try_claim(task, "b", timeout=60)
        assert taken is not None and taken.name.endswith(".claim.1") and not planted.exists(), shift


def test_a_stalled_worker_that_lost_its_claim_releases_only_its_own(tmp_path):
    """A worker that stalled past the claim timeout was taken over. Coming back while its successor
    runs the task, it must neither hold nor remove the successor's claim (else a third worker
    computes the task again). Coming back after the task was claimed afresh under its claim's very
    name, it must not take that claim for its own either: its record had been cleaned away while it
    stalled and the takeover removed its last link, so the new claim's record may have the freed
    inode number (on ext4 it does): a claim is told by the record it holds, not by its inode."""
    task = "s/s000/plan"
    for late_return in (False, True):
        folder = tmp_path / str(late_return)
        stalled, taker, third = (Claims(RenderStore(folder).claims_folder) for _ in range(3))
        mine = stalled.try_claim(task, "a", timeout=60)
        record = next(p for p in mine.parent.iterdir() if p.name.startswith(".worker"))
        if late_return:
            record.unlink()  # a start cleans a temporary name untouched for the claim timeout
        os.utime(mine, (time.time() - 120, time.time() - 120))  # no heartbeat for two minutes
        taken = taker.try_claim(task, "b", timeout=60)
        assert taken.name.endswith(".claim.1") and not mine.exists()  # the claim taken over goes at once
        if late_return:
            taker.release(taken)
            again = third.try_claim(task, "c", timeout=60)
            assert again == mine  # the same name, another worker's claim
            assert not stalled.holds(mine, task)
            stalled.release(mine)
            assert again.exists() and third.holds(again, task) and json.loads(again.read_text())["worker"] == "c"
        else:
            assert not stalled.holds(mine, task)
            stalled.release(mine)
            assert taken.exists() and taker.holds(taken, task)
            assert third.try_claim(task, "c", timeout=60) is None  # still held: nobody computes it a third time


def test_a_worker_whose_record_was_written_over_still_finishes_there(tmp_path):
    """Writing into a claim writes the worker's record, which its other claims in that folder link:
    that claim is no longer taken for the worker's own (its result is dropped), but the worker's next
    claims there link a new record, so it goes on saving."""
    claims = Claims(RenderStore(tmp_path).claims_folder)
    first = claims.try_claim("s/s000/plan", "a", timeout=60)
    first.write_text(json.dumps({"worker": "someone", "pid": 1, "host": "elsewhere", "time": 0}))
    assert not claims.holds(first, "s/s000/plan")
    claims.release(first)
    second = claims.try_claim("s/s001/plan", "a", timeout=60)
    assert os.stat(second).st_ino != os.stat(first).st_ino and claims.holds(second, "s/s001/plan")
    claims.release(second)
    assert not second.exists() and first.exists()  # the altered claim is judged by its age, as any other


def test_a_claim_removed_right_after_its_link_is_lost_not_an_error(tmp_path, monkeypatch):
    """Another worker taking the task over from a listing made just before (its previous holder
    released meanwhile) removes the fresh claim at once: the claimer has lost it, no disk error."""
    claims = Claims(RenderStore(tmp_path).claims_folder)
    link = os.link

    def link_then_taken_over(src, dst, *args, **kwargs):
        link(src, dst, *args, **kwargs)
        if str(dst).endswith(".claim.0"):
            os.unlink(dst)  # what the other worker's takeover does between our link and our look

    monkeypatch.setattr(os, "link", link_then_taken_over)
    assert claims.try_claim("s/s000/plan", "a", timeout=60) is None


def test_a_link_answered_as_existing_that_made_the_claim_holds_it(tmp_path, monkeypatch):
    """Over NFS a link whose reply was lost is sent again and answered EEXIST though it was made: the
    claim links this worker's record, so it is this worker's (not an orphan its other claims would keep
    fresh until it ends). A claim that exists as another worker's is still lost."""
    claims = Claims(RenderStore(tmp_path).claims_folder)
    link = os.link

    def made_but_answered_existing(src, dst, *args, **kwargs):
        link(src, dst, *args, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))

    monkeypatch.setattr(os, "link", made_but_answered_existing)
    claim = claims.try_claim("s/s000/plan", "a", timeout=60)
    assert claim is not None and claims.holds(claim, "s/s000/plan")
    record = json.loads(claim.read_text())["record"]  # the worker's record (named in it), kept while it runs
    claims.release(claim)
    assert not claim.exists()
    other = Claims(claims.folder)

    def another_worker_links_first(src, dst, *args, **kwargs):  # between this worker's listing and its link
        monkeypatch.setattr(os, "link", link)
        assert other.try_claim("s/s001/plan", "b", timeout=60) == Path(dst)
        link(src, dst, *args, **kwargs)  # EEXIST, and it is b's

    monkeypatch.setattr(os, "link", another_worker_links_first)
    assert claims.try_claim("s/s001/plan", "a", timeout=60) is None
    assert other.holds(other.folder / "s.s001-plan.claim.0", "s/s001/plan")
    # lost plainly: not taken as this worker's and then dropped, which would have set its record aside
    assert json.loads(claims.try_claim("s/s002/plan", "a", timeout=60).read_text())["record"] == record


def test_a_claim_the_file_system_failed_to_release_ages_out(tmp_path, monkeypatch):
    """When a release cannot look at its claim (NFS can fail for a while: ESTALE, EIO) the claim
    stays, and the worker's next claims in that folder link a new record, so they do not keep the
    old one fresh: it ages out and another worker takes it over after the claim timeout. A claim
    that cannot be looked at right after its link is left the same way, and not held; one that
    another worker cannot look at is looked at again later."""
    claims = Claims(RenderStore(tmp_path).claims_folder)
    lstat, failing_paths = os.lstat, set()

    def failing(path, *args, **kwargs):
        if str(path) in failing_paths:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", failing)
    stuck = claims.try_claim("s/s000/plan", "a", timeout=60)
    failing_paths.add(str(stuck))
    claims.release(stuck)  # no error: the task's result is saved already
    assert stuck.exists()
    old = time.time() - 120
    os.utime(stuck, (old, old))
    later = claims.try_claim("s/s001/plan", "a", timeout=60)
    assert os.stat(later).st_ino != os.stat(stuck).st_ino and os.stat(stuck).st_mtime == old
    failing_paths.clear()
    other = Claims(claims.folder)
    failing_paths.add(str(stuck))
    assert other.try_claim("s/s000/plan", "b", timeout=60) is None  # cannot look at it now: later, no crash
    failing_paths.clear()
    assert other.try_claim("s/s000/plan", "b", timeout=60).name.endswith(".claim.1")
    unseen = later.with_name("s.s002-plan.claim.0")
    failing_paths.add(str(unseen))
    assert claims.try_claim("s/s002/plan", "a", timeout=60) is None  # not held, and no error
    assert unseen.exists() and os.stat(unseen).st_ino == os.stat(later).st_ino
    assert os.stat(claims.try_claim("s/s003/plan", "a", timeout=60)).st_ino != os.stat(later).st_ino


def test_a_claim_links_its_workers_record_which_is_touched_when_linked_and_written_again_if_cleaned(tmp_path):
    """Claiming creates no file per task or per shot: every claim of a worker in a render folder,
    whatever its shot, is a hard link to its one record in the claims folder (worker, pid, host;
    links stay within a folder). An idle worker's record may be older than the claim timeout;
    linking touches it, so a new claim never looks abandoned; a record removed meanwhile (another
    worker's start cleans temporary names untouched for the claim timeout) is written again."""
    claims = Claims(RenderStore(tmp_path).claims_folder)
    first, second = (claims.try_claim(f"s/s00{i}/plan", "a", timeout=60) for i in (0, 1))
    other = claims.try_claim("t/s000/plan", "a", timeout=60)
    [record] = [p for p in claims.folder.iterdir() if p.name.startswith(".worker")]
    assert os.stat(first).st_ino == os.stat(second).st_ino == os.stat(other).st_ino == os.stat(record).st_ino
    assert sorted(p.name for p in claims.folder.iterdir() if p.is_dir()) == []  # no folder per shot
    assert json.loads(first.read_text()) | {"time": 0} == {"worker": "a", "pid": os.getpid(), "host": os.uname().nodename,
                                                           "time": 0, "record": record.name}
    for claim in (first, second, other):
        claims.release(claim)
    assert record.exists() and not first.exists() and not second.exists()  # a release frees no file
    old = time.time() - 1000
    os.utime(record, (old, old))  # idle far longer than the timeout
    third = claims.try_claim("s/s002/plan", "a", timeout=60)
    assert Claims(claims.folder).try_claim("s/s002/plan", "b", timeout=60) is None  # fresh, not taken over
    claims.release(third)
    record.unlink()  # cleaned away while the worker was idle
    fourth = claims.try_claim("s/s003/plan", "a", timeout=60)
    assert third.name == "s.s002-plan.claim.0" and fourth is not None and json.loads(fourth.read_text())["worker"] == "a"
    claims.release(fourth)
    claims.close()
    assert [p for p in claims.folder.rglob("*") if p.is_file()] == []


def test_names_in_the_claims_folder_that_are_not_claims_are_ignored(tmp_path):
    """A render folder's contents are untrusted: '²' is a digit to str.isdigit but not to int(). The
    per-shot claims folders of earlier versions (`claims/<shot>/`) are not read either."""
    store = Claims(RenderStore(tmp_path).claims_folder)
    mine = store.try_claim("s/s000/plan", "a", timeout=60)
    for name in ("s.s000-plan.claim.²", "s.s000-plan.claim.x", "s.s000-plan.claim.", "s.s000-plan.claim.1.tmp",
                 "s.s000-plan.claim.0.x", "s000-plan.claim.1"):
        (mine.parent / name).write_text("{}")
    (mine.parent / "s").mkdir()
    (mine.parent / "s" / "s000-plan.claim.1").write_text("{}")
    assert store.try_claim("s/s000/plan", "b", timeout=60) is None and store.holds(mine, "s/s000/plan")
    store.release(mine)
    assert not mine.exists() and store.try_claim("s/s000/plan", "b", timeout=60).name == "s.s000-plan.claim.0"


def test_a_folder_or_fifo_named_like_a_claim_is_taken_over_at_once(tmp_path):
    """No worker makes them (claims are files linked into place whole): waiting out --claim-timeout
    for one, then failing to remove it on release ("unexpected error: IsADirectoryError"), was wrong."""
    store = Claims(RenderStore(tmp_path).claims_folder)
    first = store.try_claim("s/s000/plan", "a", timeout=60)
    store.release(first)
    folder = first.parent
    (folder / "s.s000-plan.claim.0").mkdir()
    os.mkfifo(folder / "s.s000-plan.claim.1")
    taken = store.try_claim("s/s000/plan", "b", timeout=3600)  # at once, and without opening the FIFO
    assert taken is not None and taken.name == "s.s000-plan.claim.2" and store.holds(taken, "s/s000/plan")
    store.release(taken)
    assert not taken.exists() and (folder / "s.s000-plan.claim.0").is_dir()


def test_launch_environment_names_the_worker_and_its_team():
    """torchrun / accelerate and SLURM arrays say how many workers cooperate: priorities are tuned for that many."""
    from mmpl_cli.launch import detect

    ranks = detect({"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (ranks.mode, ranks.name, ranks.local_rank, ranks.local_world_size, ranks.team) == ("distributed", "rank3", 1, 2, 4)
    array = detect({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert array.mode == "slurm-array" and array.name.startswith("array77_2@") and array.team == 3
    assert detect({}).mode == "plain" and detect({}).team == 1


def test_a_claim_stays_alive_while_the_model_loads(tmp_path, shots_file, tiny_model_dir):
    """A worker's first task loads the model after claiming it: a load longer than the claim timeout
    (a 14B model from network storage) must not let another worker take the task over."""
    from mmpl_cli.control import Worker
    from mmpl_cli.request import RenderRequest, check
    from mmpl_cli.runtime import render

    class Loaded(Exception):
        pass

    out, ages = tmp_path / "out", []

    def slow_load(plan):
        time.sleep(3.0)  # the model loads for longer than the claim timeout below
        claim = next((out / ".mmpl" / "claims").rglob("*.claim.*"))
        ages.append(time.time() - claim.stat().st_mtime)
        raise Loaded

    checked = check(RenderRequest(shots=shots_file, out=out, model_path=str(tiny_model_dir)))
    with pytest.raises(Loaded):
        render(checked, worker=Worker(claim_timeout=2.0), make_runner=slow_load)
    assert ages and ages[0] < 2.0, ages  # touched every 0.5 s during the load: never old enough to take over
    assert not list((out / ".mmpl" / "claims").rglob("*.claim.*"))  # and released when the load failed


def test_a_heartbeat_that_fails_says_so_once_per_outage(tmp_path):
    """The claim's heartbeat cannot touch it (here: its folder is replaced by a file), then can again,
    then cannot again: a warning for each outage and a line when it recovers, not one warning ever."""
    from mmpl_cli.runtime import _Heartbeat

    claims = Claims(RenderStore(tmp_path).claims_folder)
    claim = claims.try_claim("s/s000/plan", "a", timeout=60)
    said: list[str] = []

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 30
        while len(said) < count:
            assert time.monotonic() < deadline, said
            time.sleep(0.01)

    def outage() -> None:  # the claim's folder is not a folder for a while
        claim.parent.rename(tmp_path / "away")
        claim.parent.write_text("x")

    def recovery() -> None:
        claim.parent.unlink()
        (tmp_path / "away").rename(claim.parent)

    with _Heartbeat(claims, 0.02, said.append) as beat:
        beat.hold(claim)
        outage()
        wait_for(1)
        recovery()
        wait_for(2)
        outage()
        wait_for(3)
        beat.hold(None)  # released before the folder is back: nothing more to say
        recovery()
    assert said[0].startswith("warning: cannot touch the claim s.s000-plan.claim.0") and "touched again" in said[1]
    assert said[2] == said[0] and len(said) == 3


def test_a_task_another_live_worker_holds_is_asked_for_once_a_second(tiny_model_dir, tmp_path, monkeypatch):
    """runtime.LOOK_AGAIN: while another worker's live claim holds the shot's last task, this worker
    polls the folder every 0.05 s but asks for that claim only once a second (each ask lists and reads
    the shot's claims: round trips on NFS); once the claim is gone it takes the task. Counted, not timed."""
    import threading

    shots, out = tmp_path / "one.yaml", tmp_path / "out"
    shots.write_text("version: 1\ndefaults: {steps: 1, seed: 2}\nshots:\n  - {id: k, prompt: a red ball, duration: 2}\n")
    held = Claims(RenderStore(out).claims_folder).try_claim("k/stitch", "other", timeout=120)  # our pid: alive
    asked: list[str] = []
    original = Claims.try_claim
    monkeypatch.setattr(Claims, "try_claim", lambda self, task_id, *a: asked.append(task_id) or original(self, task_id, *a))
    released = threading.Event()

    def release_when_waited() -> None:  # from the worker's first ask for it, hold the claim 3.5 s more
        while "k/stitch" not in asked:
            time.sleep(0.01)
        time.sleep(3.5)
        held.unlink()
        released.set()

    threading.Thread(target=release_when_waited, daemon=True).start()
    render_here(shots, out, tiny_model_dir)
    assert released.is_set() and (out / "k.mp4").exists()
    assert 2 <= asked.count("k/stitch") <= 6  # about one a second for 3.5 s, and the one that wins (41 with LOOK_AGAIN = 0)


def test_a_result_another_worker_wrote_damaged_is_computed_again_in_the_run(shots_file, tiny_model_dir, reference_dir,
                                                                            tmp_path, monkeypatch):
    """Another worker (here: a thread, through a real claim) finishes the first task with a file whose
    header is right and whose contents are not. This worker counts it done from its header, finds it
    damaged when the next task reads it, computes it again and finishes: the same videos as a clean
    render, nothing stopped."""
    import threading

    from safetensors.torch import save_file

    from mmpl_cli.progress import Progress

    out, first = tmp_path / "out", "k/s000/initial"
    held = Claims(RenderStore(out).claims_folder).try_claim(first, "other", timeout=120)  # our pid: alive
    asked: list[str] = []
    original = RenderStore.is_done
    monkeypatch.setattr(RenderStore, "is_done", lambda self, tid, h: asked.append(tid) or original(self, tid, h))

    def other_worker() -> None:  # once this worker has looked at the task, "finish" it damaged
        while first not in asked:
            time.sleep(0.01)
        manifest = json.loads((out / ".mmpl/manifest.json").read_text())
        task_hash = next(t["hash"] for s in manifest["shots"] for t in s["tasks"] if t["id"] == first)
        import torch

        (out / ".mmpl/tasks/k").mkdir(parents=True, exist_ok=True)
        save_file({"latents": torch.zeros(16, 2, 8, 12)}, str(out / ".mmpl/tasks/k/s000-initial.safetensors"),
                  metadata={"task": first, "hash": task_hash, "checksum": "0" * 64})
        held.unlink()

    said: list[str] = []
    progress = Progress()
    progress.message = said.append
    thread = threading.Thread(target=other_worker, daemon=True)
    thread.start()
    render_here(shots_file, out, tiny_model_dir, progress=progress, claim_timeout=30)
    assert not thread.is_alive() and any(f"{first}: task file altered (checksum mismatch)" in m for m in said), said
    assert videos(out) == videos(reference_dir)
    started = [e["task"] for e in events(out) if e["event"] == "started"]
    finished = [e["task"] for e in events(out) if e["event"] == "finished"]
    assert started[:2] == ["k/s000/plan", first] and started.count("k/s000/plan") == 2  # the plan stopped, went again
    assert finished.count(first) == 1 and finished.index(first) < finished.index("k/s000/plan")
