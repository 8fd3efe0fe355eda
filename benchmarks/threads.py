"""What one thread per task costs: `mmpl render examples/shots.yaml` before and after the render
folder fixed the CPU thread count (mmpl_cli/numerics.py), side by side in one run.

Variants, each rendering from scratch into a fresh folder, in alternating order every round:

* `before`: the code at --baseline (default: the commit before the thread count was fixed),
  extracted with `git archive` and run as it was: a plain render uses torch's default, every core;
* `now`: this checkout, plain render, the default of 1 thread;
* `now-cores`: this checkout with MMPL_CPU_THREADS set to the usable cores (what `before` used);
* `workers`: this checkout, `--workers <cores>`, 1 thread each (the fast way to use the cores);
* `workers-cores`: `--workers <cores>` with MMPL_CPU_THREADS=<cores>: more threads than cores.

Prints the median wall time of each and its ratio to `before`, and whether every variant's videos
are bit-identical to `now`'s.

    python benchmarks/threads.py [--rounds 2] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "examples" / "shots.yaml"
BASELINE = "ee3146e"  # the last commit before numerics.py


def videos(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.mp4"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmpl-threads-"))
    before = work / "before-code"
    before.mkdir()
    archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    cores = len(os.sched_getaffinity(0))
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MMPL_CPU_THREADS")}
    variants = {  # name -> (code folder, extra arguments, extra environment)
        "before": (before, [], {}),
        "now": (REPO, [], {}),
        "now-cores": (REPO, [], {"MMPL_CPU_THREADS": str(cores)}),
        "workers": (REPO, ["--workers", str(cores)], {}),
        "workers-cores": (REPO, ["--workers", str(cores)], {"MMPL_CPU_THREADS": str(cores)}),
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            code, extra, env = variants[name]
            out = work / f"r{r}-{name}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mmpl_cli", "render", str(SHOTS), "--out", str(out), *extra],
                           cwd=code, env={**base_env, "PYTHONPATH": str(code), **env}, capture_output=True, check=True)
            timings[name].append(time.perf_counter() - start)
    assert not (work / "r0-before" / ".mmpl" / "numerics.json").exists(), "the baseline did not run its own code"
    reference = videos(work / "r0-now")
    result = {"cores": cores, "rounds": args.rounds, "baseline": args.baseline, "variants": {}}
    for name, times in timings.items():
        median = statistics.median(times)
        same = all(videos(work / f"r{r}-{name}") == reference for r in range(args.rounds))
        result["variants"][name] = {"median_s": round(median, 2), "runs_s": [round(t, 2) for t in times],
                                    "vs_before": round(median / statistics.median(timings["before"]), 2),
                                    "videos_identical_to_now": same}
    print(json.dumps(result, indent=2))
    for name, v in result["variants"].items():
        print(f"{name:>14}: {v['median_s']:6.1f} s  x{v['vs_before']:.2f} of before  "
              f"same videos as now: {v['videos_identical_to_now']}")


if __name__ == "__main__":
    main()
