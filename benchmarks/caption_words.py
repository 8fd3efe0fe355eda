"""Which caption words does a model's denoiser use? Teacher-forced, as training runs it: procedural clips
that begin their video are encoded by the model's VAE, one group of each is noised, and the denoiser's
velocity error is measured with the true caption, with one word of it swapped (the direction, the
shape, the size, the shape's colour) and with no caption. A word the model uses costs error when it
is wrong; one it ignores costs nothing.

    python benchmarks/caption_words.py                          # the embedded default
    python benchmarks/caption_words.py --model-path runs/tiny/model

Same clips, noise and levels for every caption, so the differences are the words' alone.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace

import torch

from mmpl_cli.procedural import COLOURS, SIZES, Scene, render_scene, scene_from_seed
from mmpl_cli.dataset import to_model_pixels
from mmpl_cli.recipe import group_for
from mmpl_cli.wan import ContextGroup
from tiny_backend import tiny_backend

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OTHER_SHAPE = {"circle": "square", "square": "triangle", "triangle": "circle"}


def swapped(scene: Scene) -> dict[str, str]:
    """The caption with each kind of word replaced by another of its kind."""
    colour = next(c for c in sorted(COLOURS) if c not in (scene.colour, scene.background))
    size = next(s for s in SIZES if s != scene.size)
    return {"true caption": scene.caption(),
            "direction swapped": replace(scene, direction=OPPOSITE[scene.direction]).caption(),
            "shape swapped": replace(scene, shape=OTHER_SHAPE[scene.shape]).caption(),
            "size swapped": replace(scene, size=size).caption(),
            "colour swapped": replace(scene, colour=colour).caption(),
            "no caption": ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--model-path", default=None)
    args = ap.parse_args()

    profile, root, backend = tiny_backend(args.model_path)
    layout, sigmas = profile.layout, (0.3, 0.6, 0.9)
    scenes = [scene_from_seed(5000 + i) for i in range(args.clips)]
    latents = [backend.encode(to_model_pixels(render_scene(s, profile.segment_frames, profile.width, profile.height)))
               for s in scenes]
    groups = ("initial", "plan", "populate_stage_one")
    error = {g: {} for g in groups}
    apart: dict[str, float] = {}  # how far the text encoder puts each caption from the true one
    for scene in scenes:
        captions = swapped(scene)
        for name, caption in captions.items():
            distance = (backend.encode_text(caption) - backend.encode_text(captions["true caption"])).norm()
            apart[name] = apart.get(name, 0.0) + float(distance) / len(scenes)
    gen = torch.Generator().manual_seed(0)
    for kind in groups:
        targets, sees, context = group_for(kind, layout, random.Random(0))
        for scene, z in zip(scenes, latents):
            context_groups = [ContextGroup(z[:, list(frames)], frames, group_sees) for frames, group_sees in context]
            clean = z[:, list(targets)]
            noises = [torch.randn(clean.shape, generator=gen) for _ in sigmas]  # the same for every caption
            for name, caption in swapped(scene).items():
                evaluate = backend.reference_evaluator(targets, sees, context_groups, [backend.encode_text(caption)])
                for sigma, noise in zip(sigmas, noises):
                    with torch.no_grad():
                        flow = evaluate((1 - sigma) * clean + sigma * noise, torch.tensor(sigma * 1000.0), 0)
                    share = float((flow - (noise - clean)).pow(2).mean()) / (len(scenes) * len(sigmas))
                    error[kind][name] = error[kind].get(name, 0.0) + share
    names = list(error[groups[0]])
    print(f"velocity error (mean over {len(scenes)} clips at noise levels {', '.join(map(str, sigmas))}), "
          f"and the change from the true caption's, of {root}:\n")
    print(f"| group | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for kind in groups:
        base = error[kind]["true caption"]
        cells = [f"{error[kind][n]:.4f}" + ("" if n == "true caption" else f" ({100 * (error[kind][n] / base - 1):+.1f}%)")
                 for n in names]
        print(f"| {kind} | {' | '.join(cells)} |")
    print(f"| text encoder: distance from the true caption's embeddings | {' | '.join(f'{apart[n]:.2f}' for n in names)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
