"""Peak memory of `mmpl plan` and `mmpl eval` as their input grows, side by side in one run.

`plan`: one shot of an hour, a day (text and --json with a 4-GPU schedule) and 30 day-long shots.
`eval`: an 832x480 video of 10 s and of 60 s (testsrc2, made with the bundled ffmpeg); eval
streams its frames, so the two should need the same memory. Each command runs as its own
process; its peak resident memory comes from its own rusage (os.wait4).

    python benchmarks/input_memory.py [--skip-thirty-days]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measured(*args: str) -> tuple[float, float]:
    """(peak resident MB, seconds) of `python -m mmpl_cli ARGS`."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a child that writes a lot cannot block on it
        proc = subprocess.Popen([sys.executable, "-m", "mmpl_cli", *args], stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"mmpl {' '.join(args)} failed: {err.read().decode()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def shots(folder: Path, name: str, count: int, seconds: float) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text("version: 1\nshots:\n" + "".join(
        f"  - {{id: s{i}, prompt: a long day, duration: {seconds}}}\n" for i in range(count)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-thirty-days", action="store_true", help="leave out the 30-day case (minutes, GBs)")
    args = parser.parse_args()
    from mmpl_cli.video import ffmpeg_binary

    work = Path(tempfile.mkdtemp(prefix="mmpl-bench-"))
    rows = [("plan, 1 shot of 1 hour", ("plan", str(shots(work, "hour", 1, 3600)))),
            ("plan, 1 shot of 1 day", ("plan", str(shots(work, "day", 1, 86400)))),
            ("plan --json --gpus 4, 1 shot of 1 day", ("plan", str(work / "day.yaml"), "--json", "--gpus", "4"))]
    if not args.skip_thirty_days:
        rows.append(("plan --json, 30 shots of 1 day", ("plan", str(shots(work, "days", 30, 86400)), "--json")))
    for seconds in (10, 60):
        video = work / f"{seconds}s.mp4"
        subprocess.run([ffmpeg_binary(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=832x480:rate=16",
                        "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(video)],
                       check=True)
        rows.append((f"eval, {seconds} s of 832x480 at 16 fps", ("eval", str(video))))
    print(f"{'command':42s} {'peak MB':>8s} {'seconds':>8s}")
    for what, command in rows:
        mb, seconds = measured(*command)
        print(f"{what:42s} {mb:8.0f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
