"""Does the VAE keep what the denoiser has to draw? Encodes and decodes the 81-frame clips of
`benchmarks/prompts.py`'s prompts (the videos those captions describe) with a model's VAE and judges
the round trip as that benchmark judges renders: background colour of the first and last frame, and
whether the shape still moves the prompted way over the first second. The originals pass every
check, so a miss is the VAE's, and the round trip bounds what a render of the prompts can score.

    python benchmarks/vae_roundtrip.py                          # 20 clips, the embedded default's VAE
    python benchmarks/vae_roundtrip.py --model-path runs/tiny/model
"""

from __future__ import annotations

import argparse
import sys

import torch

from mmpl_cli.procedural import judge, prompt_scenes, render_scene
from mmpl_cli.dataset import to_model_pixels
from mmpl_cli.render import to_uint8_frames
from tiny_backend import tiny_backend


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--model-path", default=None)
    args = ap.parse_args()

    profile, root, backend = tiny_backend(args.model_path)
    width, height, frames = profile.width, profile.height, profile.segment_frames
    counts = {"first_ok": 0, "last_ok": 0, "direction_ok": 0}
    for scene in prompt_scenes(args.count):
        with torch.no_grad():
            video = to_uint8_frames(backend.decode(backend.encode(to_model_pixels(render_scene(scene, frames, width, height)))))
        result = judge(video, scene)
        counts = {k: v + result[k] for k, v in counts.items()}
        print(f"{result['prompt']:<62} last {result['background_last']:<8} moved {result['motion']} "
              f"{'ok' if result['direction_ok'] else '--'}")
    n = args.count
    print(f"\n{n} clips of {frames} frames through the VAE of {root}: background of the first frame "
          f"{counts['first_ok']}/{n}, of the last frame {counts['last_ok']}/{n}, shape moving the prompted way "
          f"{counts['direction_ok']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
