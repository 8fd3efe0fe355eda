"""Does the default model render what the prompt says? Renders procedural-style prompts ("a small red
circle moving right on a blue background") with `mmpl render` and judges every video: the background
colour of the first and the last frame (named by nearest hue) and the direction the shape moves over
the first second.

    python benchmarks/prompts.py                       # 20 prompts of 5 s on the embedded default
    python benchmarks/prompts.py --count 2 --duration 60 --frames benchmarks/results/default-60s.png

`--frames` writes the first and last frame of every video side by side, one row per video (the
README's picture).
`--model-path` judges another Diffusers folder (say runs/tiny/model after `mmpl train`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mmpl_cli.procedural import judge, prompt_scenes, prompt_shot_list
from mmpl_cli.video import read_frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--out", default=None, help="render folder (default: a temporary one)")
    ap.add_argument("--frames", default=None, help="PNG of every video's first and last frames, a row each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    scenes = prompt_scenes(args.count)
    out = Path(args.out or tempfile.mkdtemp(prefix="mmpl-prompts-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "shots.yaml").write_text(yaml.safe_dump(prompt_shot_list(scenes, args.duration), sort_keys=False))
    cmd = [sys.executable, "-m", "mmpl_cli", "render", str(out / "shots.yaml"), "--out", str(out / "render")]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started

    videos = [read_frames(out / "render" / f"p{i:02d}.mp4") for i in range(len(scenes))]
    results = [judge(video, s) for video, s in zip(videos, scenes)]
    if args.frames:
        rows = []
        for video in videos:
            rows += [np.concatenate([video[0], np.full((video.shape[1], 4, 3), 255, np.uint8), video[-1]], 1),
                     np.full((4, video.shape[2] * 2 + 4, 3), 255, np.uint8)]
        picture = np.concatenate(rows[:-1], 0)
        Path(args.frames).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.Resampling.NEAREST).save(args.frames)
    summary = {"prompts": len(results), "duration_s": args.duration, "render_s": round(seconds, 1),
               "first_frame_background": sum(r["first_ok"] for r in results),
               "last_frame_background": sum(r["last_ok"] for r in results),
               "direction": sum(r["direction_ok"] for r in results), "videos": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for r in results:
        print(f"{r['prompt']:<62} first {r['background_first']:<8} last {r['background_last']:<8} "
              f"moved {r['motion']} {'ok' if r['direction_ok'] else '--'}")
    n = len(results)
    print(f"\n{n} prompts of {args.duration:g} s, rendered in {seconds:.0f} s: background of the first frame "
          f"{summary['first_frame_background']}/{n}, of the last frame {summary['last_frame_background']}/{n}, "
          f"shape moving the prompted way {summary['direction']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
