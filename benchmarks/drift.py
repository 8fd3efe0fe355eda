"""Does macro-from-micro planning drift less than extending a video window by window? The same
prompts, rendered for the same length on the same model with each strategy and with MMPL's two
boundary fixes switched off, measured with `mmpl eval` (the MMPL paper, Table 5, 13, 14).

    python benchmarks/drift.py                      # 5 prompts x 60 s on the embedded default
    python benchmarks/drift.py --prompts 2 --duration 20 --variants mmpl sliding-window

Variants:
  mmpl               the default strategy, with the shipped profile as it is
  planning           mmpl, handover: planning (decode every planning latent in order, re-encode the tail)
  reencode           mmpl, handover: reencode (decode [L0, anchor[0], anchor], re-encode the tail)
  no-reencode        mmpl, handover: direct (the anchor latents as they are; App. F off)
  no-noise-init      mmpl, but populating edges start from their own noise (App. G off)
  decode-alone       mmpl, decode: alone (each segment's frames decoded from its own initial latents,
                     as MMPL's released code; the default decodes them after the previous window)
  sliding-window     each window conditioned on the previous window's last 5 latents, as they are
  progressive        PA-VDM: chunks of 2 latents one noise level apart, one clean chunk in front

Every figure is a mean over the prompts. "join step" is `mmpl eval`'s join step ratio: how far the
background hue (degrees) and the hue histogram (H-L1) jump at a segment join, over the median
jump between consecutive frames inside the segments (1.0: a join is like any other frame). "bg last"
counts the videos whose last frame still shows the prompted background colour (nearest hue). Render
time is wall-clock seconds for all prompts of a variant, one after another, on this machine.
`--json FILE` keeps every per-video metric.
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

from mmpl_cli.evaluate import evaluate_video
from mmpl_cli.procedural import judge, prompt_scenes, prompt_shot_list
from mmpl_cli.profiles import builtin_profiles_dir
from mmpl_cli.video import read_frames

VARIANTS = {  # strategy, changes to the tiny profile
    "mmpl": ("mmpl", {}),
    "planning": ("mmpl", {"handover": "planning"}),
    "reencode": ("mmpl", {"handover": "reencode"}),
    "no-reencode": ("mmpl", {"handover": "direct"}),
    "no-noise-init": ("mmpl", {"noise_init": {"enabled": False}}),
    "decode-alone": ("mmpl", {"decode": "alone"}),
    "sliding-window": ("sliding-window", {}),
    "progressive": ("progressive", {}),
}


def render_variant(name: str, scenes, duration: float, folder: Path, model_path: str | None) -> tuple[list[dict], float]:
    strategy, changes = VARIANTS[name]
    profile = folder / f"{name}.profile.yaml"  # the shipped profile with the variant's switches
    data = yaml.safe_load((builtin_profiles_dir() / "tiny.yaml").read_text())
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    profile.write_text(yaml.safe_dump({**data, "name": f"tiny-{name}"}, sort_keys=False))
    shots = prompt_shot_list(scenes, duration, profile=str(profile), strategy=strategy)
    shot_list = folder / f"{name}.yaml"
    shot_list.write_text(yaml.safe_dump(shots, sort_keys=False))
    out = folder / name
    cmd = [sys.executable, "-m", "mmpl_cli", "render", str(shot_list), "--out", str(out)]
    if model_path:
        cmd += ["--model-path", model_path]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    results = []
    for i, scene in enumerate(scenes):
        video = out / f"p{i:02d}.mp4"
        metrics = evaluate_video(video, out)
        metrics["judge"] = judge(read_frames(video), scene)
        results.append(metrics)
    return results, seconds


def summarize(results: list[dict]) -> dict:
    def mean(get):
        values = [get(r) for r in results]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "first_last_h_l1": mean(lambda r: r["first_last"]["h_l1"]),
        "first_last_h_corr": mean(lambda r: r["first_last"]["h_corr"]),
        "joins_h_l1": mean(lambda r: r["joins"].get("h_l1_mean")),
        "joins_h_corr": mean(lambda r: r["joins"].get("h_corr_mean")),
        "join_step_deg": mean(lambda r: r["joins"].get("step_ratio_deg")),
        "join_step_h_l1": mean(lambda r: r["joins"].get("step_ratio_h_l1")),
        "plan_content_h_l1": mean(lambda r: r["plan_content"].get("h_l1_mean")),
        "plan_content_h_corr": mean(lambda r: r["plan_content"].get("h_corr_mean")),
        "flicker": mean(lambda r: r["flicker"]["mean"]),
        "background_last": sum(r["judge"]["last_ok"] for r in results),
        "videos": len(results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--out", default=None, help="render folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write every metric to this file")
    args = ap.parse_args()

    scenes = prompt_scenes(args.prompts, seed=1)
    folder = Path(args.out or tempfile.mkdtemp(prefix="mmpl-drift-"))
    folder.mkdir(parents=True, exist_ok=True)
    table, everything = [], {}
    for name in args.variants:
        results, seconds = render_variant(name, scenes, args.duration, folder, args.model_path)
        summary = {**summarize(results), "render_s": seconds}
        everything[name] = {"summary": summary, "videos": results}
        table.append((name, summary))
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr, flush=True)

    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    print(f"{args.prompts} prompts x {args.duration:g} s, embedded default model unless --model-path\n")
    print("| variant | first-last H-L1 ↓ | H-corr ↑ | joins H-L1 ↓ | H-corr ↑ | join step, deg ↓ | join step, H-L1 ↓ "
          "| plan/content H-L1 ↓ | H-corr ↑ | flicker ↓ | bg last | render s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in table:
        print(f"| {name} | {f(s['first_last_h_l1'])} | {f(s['first_last_h_corr'])} | {f(s['joins_h_l1'])} | "
              f"{f(s['joins_h_corr'])} | {f(s['join_step_deg'], 1)} | {f(s['join_step_h_l1'], 1)} | "
              f"{f(s['plan_content_h_l1'])} | {f(s['plan_content_h_corr'])} | "
              f"{f(s['flicker'], 4)} | {s['background_last']}/{s['videos']} | {s['render_s']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"prompts": [s.caption() for s in scenes], "duration_s": args.duration,
                                               "variants": everything}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
