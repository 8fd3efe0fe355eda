"""What a worker costs per task when the batch is large: a thousand shots, eight workers, one folder.

Eight worker processes render one shot list into one render folder through mmpl's own runtime
(claims, ready tasks, the store's atomic writes, per-worker event logs) with a runner that computes
nothing (`NullRunner`, kept here, not in the package): a denoising task reads its inputs and returns
zero latents of the tiny profile's shape, a decode task returns black frames that ffmpeg encodes,
a stitch joins them with ffmpeg. So what is measured is mmpl's overhead, not a model's work:

  overhead per task   a worker's time from the end of one task's `run` to the next one's reading
                      its inputs (save + log + release of the one, pick + claim + inputs of the
                      next: an input dropped from memory is read again from the folder), median
                      and p90 over all workers, in wall-clock seconds and in the worker's own CPU
                      seconds (eight workers and their ffmpeg children share two cores here, so
                      the wall-clock figure is mostly waiting for a core); also its median
                      without reading the inputs: claim + pick + save + log alone
  where it goes       for denoising tasks, the mean of the same gap split by the kernel's own count
                      of the worker's main thread (/proc/thread-self/schedstat): on a core, waiting
                      in the run queue for one, and the rest (blocked: fsync, reads)
  memory              each worker's resident memory after its 500th task and its peak at the end
  status              `mmpl status --json` on the finished folder, wall seconds
  start-up            from a worker's launch to its first task (imports, plans, priorities, hashes):
                      the first and the last of the eight, and one worker started alone; beside them,
                      torch's import alone: the last of as many `python -c "import torch"` as there
                      are workers, started together right after the run (the part that is not mmpl's;
                      the collector paused, as a worker pauses it for torch's import)
  file creation       CPU microseconds to create an empty file, in 30 new folders laid out as a
                      render's tasks beside the run's, just before it: the state of the disk the run
                      met (below)

    python benchmarks/scale.py                         # 100 and 1000 shots (1,100 and 11,000 tasks)
    python benchmarks/scale.py --shots 1000 --workers 8 --json benchmarks/results/scale.json
    python benchmarks/scale.py --shots 40 --latent-size 832x480   # task files of Wan's size (8 MB a segment)

On ext4 without a journal (this project's CI and 2-core machines), a new file's inode skips every
inode freed near it in the last one to six minutes (the kernel's recently_deleted,
fs/ext4/ialloc.c), each skip a lookup: creating a file costs about 20 us of CPU, and 150–780 us in
the minutes after 17,000 files were removed beside it (new folders land where the removed ones
were). A worker creates a file or two a task, so a run started then, or right after the test suite
or another run removed its files, is slower throughout, whatever mmpl's code. The `file creation us`
column says which state a run met; leave six minutes after removing many files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHOT_SECONDS = 9  # two segments at the tiny profile's 16 fps: 11 tasks per shot


def _schedstat() -> tuple[int, int] | None:
    """Nanoseconds this thread has run on a core, and waited in a run queue for one (Linux)."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            ran, waited, _ = fh.read().split()
        return int(ran), int(waited)
    except (OSError, ValueError):
        return None


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class NullRunner:
    """Runs a shot's tasks without a model: inputs are read (as a real task reads them), outputs are
    zeros of the right shape, videos are real files made by ffmpeg."""

    def __init__(self, plan, store, stats: dict, size: tuple[int, int] | None = None):
        self.plan, self.store, self.stats = plan, store, stats
        profile = plan.profile
        width, height = size or (profile.width, profile.height)  # --latent-size: Wan-sized task files
        self.shape = (16, height // profile.vae_spatial, width // profile.vae_spatial)

    def run(self, task, results):
        import numpy as np
        import torch

        from mmpl_cli.results import Frames, Latents, Parts
        from mmpl_cli.terms import Kind

        before_inputs = time.perf_counter()
        inputs = [results[dep] for dep in task.deps]  # as a real task reads them: mmpl's cost, counted
        # the gap's end: a wait at a syscall's return is counted by the next schedstat read, so nothing
        # that can wait (process_time is a syscall) comes between the clock and the read, here or below
        stats, now = self.stats, time.perf_counter()
        sched, cpu = _schedstat(), time.process_time()
        if stats["ran"] == 0:
            stats["first_task_s"] = time.time() - stats["launched"]
            stats["first_task_cpu_s"] = cpu
            if stats["first_only"]:  # start-up alone: that is all we came for
                Path(stats["path"]).write_text(json.dumps({"first_task_s": stats["first_task_s"], "first_task_cpu_s": cpu}))
                os._exit(0)
        else:
            stats["overhead_s"].append(now - stats["last_end"])
            stats["inputs_s"].append(now - before_inputs)
            stats["overhead_cpu_s"].append(cpu - stats["last_cpu"])
            if sched and stats["last_sched"]:
                stats["overhead_sched_s"].append([(a - b) / 1e9 for a, b in zip(sched, stats["last_sched"])])
        if task.kind == Kind.STITCH:
            made = Parts([r.path for r in inputs], self.store.shot_video(self.plan.shot.id))
        elif task.kind == Kind.DECODE:
            seg = self.plan.segments[task.segment]
            made = Frames(np.zeros((seg.kept, self.plan.profile.height, self.plan.profile.width, 3), np.uint8),
                          self.store.segment_video(self.plan.shot.id, seg.index))
        else:
            group = self.plan.profile.layout.group(task.kind)
            made = Latents(torch.zeros(self.shape[0], len(group.targets), *self.shape[1:]))
        stats["ran"] += 1
        stats["kinds"].append(task.kind)
        if stats["ran"] == 500:
            stats["rss_500_mb"] = _rss_mb("VmRSS")
        stats["last_end"] = time.perf_counter()
        stats["last_sched"], stats["last_cpu"] = _schedstat(), time.process_time()
        return made


def worker(args) -> None:
    """One worker process, as `mmpl render --as-worker` runs (cli.render, launch.run): check the
    request (before torch is imported), then run the runtime."""
    from mmpl_cli.request import RenderRequest, check

    checked = check(RenderRequest(shots=Path(args.shots_file), out=Path(args.out), seeding="terminal", device="cpu"))
    from mmpl_cli.control import StopFlag, Worker
    from mmpl_cli.launch import import_render
    from mmpl_cli.progress import Progress
    from mmpl_cli.store import RenderStore

    render = import_render()  # as launch.run imports it

    stats = {"launched": args.launched, "ran": 0, "overhead_s": [], "overhead_cpu_s": [], "overhead_sched_s": [], "inputs_s": [],
             "kinds": [], "last_end": 0.0,
             "first_only": args.first_only, "path": args.stats}
    store = RenderStore(checked.out)
    render(checked, Progress(), StopFlag(), Worker(name=f"w{args.worker}", team=args.team, poll=0.05),
           make_runner=lambda plan: NullRunner(plan, store, stats, args.latent_size))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # the time between two tasks holds the first one's save, log and release and the second one's
    # pick and claim: it is counted as the first one's (a video task's save runs ffmpeg)
    kinds = stats["kinds"][:-1]
    Path(args.stats).write_text(json.dumps({
        "tasks": stats["ran"], "first_task_s": stats.get("first_task_s"), "first_task_cpu_s": stats.get("first_task_cpu_s"),
        "rss_500_mb": stats.get("rss_500_mb"),
        "peak_rss_mb": _rss_mb("VmHWM"), "cpu_s": usage.ru_utime + usage.ru_stime,
        "overhead_s": stats["overhead_s"], "overhead_cpu_s": stats["overhead_cpu_s"],
        "overhead_sched_s": stats["overhead_sched_s"], "inputs_s": stats["inputs_s"], "kinds": kinds}))
    from mmpl_cli.launch import exiting

    exiting()  # as the CLI ends a process


def write_shots(path: Path, shots: int) -> Path:
    path.write_text("version: 1\ndefaults: {profile: tiny, seed: 7}\nshots:\n" + "".join(
        f"  - {{id: s{i:04d}, prompt: a small red circle moving left on a blue background, duration: {SHOT_SECONDS}}}\n"
        for i in range(shots)))
    return path


def start_alone(shots: int, folder: Path) -> dict:
    """One worker by itself on a new folder, stopped at its first task: seconds and CPU seconds."""
    shots_file, stats = write_shots(folder / "alone.yaml", shots), folder / "alone.json"
    launched = time.time()
    subprocess.run([sys.executable, __file__, "--worker", "0", "--team", "8", "--shots-file", str(shots_file),
                    "--out", str(folder / "alone"), "--launched", repr(launched), "--stats", str(stats), "--first-only"],
                   check=True)
    found = json.loads(stats.read_text())
    return {"s": round(found["first_task_s"], 2), "cpu_s": round(found["first_task_cpu_s"], 2)}


def creation_us(folder: Path, folders: int = 30, each: int = 10) -> float:
    """The `file creation` column (module docstring): the files are kept, since freeing them would
    slow the run."""
    start = time.process_time()
    for k in range(folders):
        shot = folder / "creation-probe" / ".mmpl" / "tasks" / f"s{k:04d}"
        shot.mkdir(parents=True)
        for i in range(each):
            os.close(os.open(shot / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    return round(1e6 * (time.process_time() - start) / (folders * each), 1)


def torch_alone(workers: int) -> float:
    """The `torch's import alone` figure (module docstring), in seconds: to the end of the last import,
    not of its process (torch's exit takes a while), with the collector paused as a worker pauses it."""
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", "import gc; gc.disable(); import time, torch; print(time.time())"],
                              stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    printed = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("python -c 'import torch' failed (its message is above)")
    return round(max(float(text.split()[-1]) for text in printed) - start, 2)


def run_batch(shots: int, workers: int, folder: Path, latent_size: tuple[int, int] | None = None) -> dict:
    shots_file = write_shots(folder / "shots.yaml", shots)
    creation = creation_us(folder)
    if creation > 100:
        print(f"note: creating a file costs {creation:.0f} us of CPU here (about 20 where no files were removed "
              "nearby in the last six minutes): this run will be slower throughout", file=sys.stderr, flush=True)
    out, stats_dir = folder / "out", folder / "stats"
    stats_dir.mkdir()
    launched = time.time()
    size = ["--latent-size", "x".join(map(str, latent_size))] if latent_size else []
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--team", str(workers),
                               "--shots-file", str(shots_file), "--out", str(out), "--launched", repr(launched),
                               "--stats", str(stats_dir / f"w{i}.json"), *size]) for i in range(workers)]
    if any(p.wait() for p in procs):
        raise SystemExit("a worker failed (its message is above)")
    wall = time.time() - launched
    importing = torch_alone(workers)  # after the run: its workers met the page cache as before this figure
    per = [json.loads((stats_dir / f"w{i}.json").read_text()) for i in range(workers)]
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "mmpl_cli", "status", str(out), "--json"], capture_output=True, text=True)
    status_s = time.perf_counter() - start
    if status.returncode != 0:
        raise SystemExit(status.stderr)
    report = json.loads(status.stdout)
    tasks = len(report["tasks"])
    computed = [t["computed"] for t in report["tasks"]]
    overhead = sorted(o for w in per for o in w["overhead_s"])
    without_inputs = sorted(o - i for w in per for o, i in zip(w["overhead_s"], w["inputs_s"]))
    overhead_cpu = sorted(o for w in per for o in w["overhead_cpu_s"])
    latent = sorted(o for w in per for o, k in zip(w["overhead_s"], w["kinds"]) if k not in ("decode", "stitch"))
    video = sorted(o for w in per for o, k in zip(w["overhead_s"], w["kinds"]) if k in ("decode", "stitch"))
    # the denoising tasks' gaps, split: on a core, waiting for one, the rest (means, so the parts add up)
    split = [(o, *s) for w in per for o, k, s in zip(w["overhead_s"], w["kinds"], w["overhead_sched_s"])
             if k not in ("decode", "stitch")]
    mean = lambda i: round(1000 * sum(r[i] for r in split) / len(split), 1) if split else None  # noqa: E731
    q = lambda xs, f: round(1000 * xs[min(len(xs) - 1, int(f * len(xs)))], 1) if xs else None  # noqa: E731
    return {
        "shots": shots, "workers": workers, "tasks": tasks, "latent_size": latent_size, "wall_s": round(wall, 1),
        "file_creation_us": creation,
        "remaining": report["remaining"], "computed_once": computed.count(1),
        "computed_twice_or_more": sum(c > 1 for c in computed),
        "overhead_ms": {"median": q(overhead, 0.5), "p90": q(overhead, 0.9),
                        "median_latent_tasks": q(latent, 0.5), "median_video_tasks": q(video, 0.5),
                        "median_without_reading_inputs": q(without_inputs, 0.5)},
        "latent_tasks_mean_ms": {"wall": mean(0), "on_a_core": mean(1), "waiting_for_a_core": mean(2),
                                 "blocked": round(mean(0) - mean(1) - mean(2), 1) if split else None},
        "overhead_cpu_ms": {"median": q(overhead_cpu, 0.5), "p90": q(overhead_cpu, 0.9)},
        "cpu_ms_per_task": round(1000 * sum(w["cpu_s"] for w in per) / max(1, sum(w["tasks"] for w in per)), 1),
        "tasks_per_worker": [w["tasks"] for w in per],
        "start_s": {"first": round(min(w["first_task_s"] for w in per if w["first_task_s"] is not None), 2),
                    "last": round(max(w["first_task_s"] for w in per if w["first_task_s"] is not None), 2),
                    "cpu_median": round(statistics.median(w["first_task_cpu_s"] for w in per if w["first_task_cpu_s"]), 2),
                    "torch_alone": importing},
        "rss_mb": [{"after_500": w["rss_500_mb"] and round(w["rss_500_mb"]), "peak": round(w["peak_rss_mb"])} for w in per],
        "status_s": round(status_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--keep", default=None, help="render into this new folder and keep it (one --shots only)")
    parser.add_argument("--latent-size", type=lambda t: tuple(int(v) for v in t.split("x")), default=None,
                        metavar="WxH", help="task files of latents this size (832x480: Wan's); videos stay the tiny profile's")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the rest: one worker process's arguments
    parser.add_argument("--team", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shots-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)
    os.environ.setdefault("MMPL_CACHE_DIR", tempfile.mkdtemp(prefix="mmpl-cache-"))
    rows = []
    # every run's folder is removed at the end, not between runs: ext4 skips inodes freed within the
    # last minutes when it allocates new ones, so removing a run's 30,000 files slows the run after it
    with tempfile.TemporaryDirectory(prefix="mmpl-scale-") as tmp:
        for shots in args.shots:
            if args.keep:
                Path(args.keep).mkdir(parents=True)
                row = run_batch(shots, args.workers, Path(args.keep), args.latent_size)
            else:
                (folder := Path(tmp) / f"shots-{shots}").mkdir()
                row = run_batch(shots, args.workers, folder, args.latent_size)
                row["start_s"]["alone"] = start_alone(shots, folder)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| shots | tasks | workers | overhead median ms (latent / video tasks) | p90 ms | overhead CPU ms median "
          "| denoising tasks, mean ms: on a core / waiting for one / blocked "
          "| start s: first, last worker [torch's import alone]; one alone (CPU s) "
          "| RSS peak over RSS after 500 tasks | status s | wall s "
          "| file creation us |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        grown = [m["peak"] / m["after_500"] - 1 for m in r["rss_mb"] if m["after_500"]]
        rss = f"{max(grown):+.1%} most" if grown else "fewer than 500 tasks each"
        o, s, m = r["overhead_ms"], r["start_s"], r["latent_tasks_mean_ms"]
        alone = s.get("alone", {})
        print(f"| {r['shots']} | {r['tasks']} | {r['workers']} | {o['median']} ({o['median_latent_tasks']} / "
              f"{o['median_video_tasks']}; {o['median_without_reading_inputs']}) | "
              f"{o['p90']} | {r['overhead_cpu_ms']['median']} | "
              f"{m['on_a_core']} / {m['waiting_for_a_core']} / {m['blocked']} | "
              f"{s['first']}, {s['last']} [{s['torch_alone']}]; {alone.get('s')} ({alone.get('cpu_s')}) | {rss} | "
              f"{r['status_s']} | {r['wall_s']} | {r['file_creation_us']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
