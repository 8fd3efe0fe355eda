"""Where does a render's motion come from: the prompt's direction word, or the first latents? For
`benchmarks/prompts.py`'s 20 prompts, the plan and populate stage one are denoised as a render runs
them (same sampler, guidance and layout) from three starts, and frames 0 to 16 are judged as that
benchmark judges them (did the shape move the prompted way):

- the true clip's initial latents (the caption's video, encoded by the model's VAE), true caption;
- the same latents with the caption's direction word reversed ("left" for "right");
- the model's own initial group, denoised from noise, true caption (as a render does).

If the first two agree, the plan follows the motion it sees in its context, not the word.

    python benchmarks/direction_source.py                        # the embedded default, about a minute
    python benchmarks/direction_source.py --model-path runs/tiny/model
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from mmpl_cli.procedural import judge, prompt_scenes, render_scene
from mmpl_cli.dataset import to_model_pixels
from mmpl_cli.render import to_uint8_frames
from mmpl_cli.wan import ContextGroup
from caption_words import OPPOSITE
from tiny_backend import tiny_backend

STARTS = ("true initial latents", "true initial latents, direction reversed", "the model's own initial group")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--model-path", default=None)
    args = ap.parse_args()

    profile, root, backend = tiny_backend(args.model_path)
    layout, sampler = profile.layout, profile.sampler
    initial, plan, populate = layout.initial, layout.plan, layout.populate_stage_one
    judged = populate.targets[0] + 1  # latents up to the first populated one: frames 0-16 of the tiny layout
    ok = dict.fromkeys(STARTS, 0)
    for i, scene in enumerate(prompt_scenes(args.count)):
        clip = backend.encode(to_model_pixels(render_scene(scene, profile.segment_frames, profile.width, profile.height)))
        noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(i))
        reversed_caption = replace(scene, direction=OPPOSITE[scene.direction]).caption()
        verdicts = []
        for start in STARTS:
            text = backend.text(reversed_caption if "reversed" in start else scene.caption(), "", sampler.guidance)
            first = clip[:, list(initial)] if start.startswith("true") else \
                backend.denoise(noise[:, list(initial)], initial, (), [], text, sampler)
            context = [ContextGroup(first, initial, ())]
            keys = backend.denoise(noise[:, list(plan.targets)], plan.targets, plan.sees, context, text, sampler)
            context.append(ContextGroup(keys, plan.targets, plan.sees))
            filled = backend.denoise(noise[:, list(populate.targets)], populate.targets, populate.sees, context, text, sampler)
            latents = clip.clone()
            for frames, values in ((initial, first), (plan.targets, keys), (populate.targets, filled)):
                latents[:, list(frames)] = values
            video = to_uint8_frames(backend.decode(latents[:, :judged]))
            good = judge(video, scene)["direction_ok"]
            ok[start] += good
            verdicts.append("ok" if good else "--")
        print(f"{scene.caption():<62} {' '.join(verdicts)}", flush=True)
    n = args.count
    print(f"\nshape moving the prompted way over frames 0-16, of {n}, on {root}:")
    for start in STARTS:
        print(f"  from {start}: {ok[start]}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
