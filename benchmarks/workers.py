"""Two workers against one on the same multi-segment shot with the embedded tiny model, side by side.

Each round renders the shot from scratch into fresh folders, once with `--workers 1` and once with
`--workers 2` (alternating which goes first), through the real CLI. Reports the median wall-clock
speed-up next to the speed-up that `mmpl plan --gpus 2` simulates from the tiny profile's stage costs.

    python benchmarks/workers.py [--rounds 3] [--duration 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mmpl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpl_cli", *args], capture_output=True, text=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=24.0, help="seconds of video (24 s = 5 segments)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmpl-bench-"))
    shots = work / "shots.yaml"
    shots.write_text(f"version: 1\ndefaults: {{steps: {args.steps}}}\nshots:\n"
                     f"  - {{id: bench, prompt: 'a ship at sea', duration: {args.duration}}}\n")
    timings: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            start = time.perf_counter()
            mmpl("render", str(shots), "--out", str(work / f"r{r}-w{n}"), "--workers", str(n))
            timings[n].append(time.perf_counter() - start)
    same = all((work / f"r{r}-w1" / "bench.mp4").read_bytes() == (work / f"r{r}-w2" / "bench.mp4").read_bytes()
               for r in range(args.rounds))
    simulated = {n: json.loads(mmpl("plan", str(shots), "--gpus", str(n), "--json").stdout) for n in (1, 2)}
    result = {
        "segments": simulated[1]["shots"][0]["segments"],
        "one_worker_s": statistics.median(timings[1]), "two_workers_s": statistics.median(timings[2]),
        "simulated_one_s": simulated[1]["makespan_s"], "simulated_two_s": simulated[2]["makespan_s"],
        "videos_identical": same,
    }
    result["speedup"] = result["one_worker_s"] / result["two_workers_s"]
    result["simulated_speedup"] = result["simulated_one_s"] / result["simulated_two_s"]
    print(json.dumps(result, indent=2))
    print(f"{result['segments']} segments: 1 worker {result['one_worker_s']:.1f} s, 2 workers "
          f"{result['two_workers_s']:.1f} s -> x{result['speedup']:.2f} measured (median of {args.rounds}), "
          f"x{result['simulated_speedup']:.2f} simulated; videos identical: {same}")


if __name__ == "__main__":
    main()
