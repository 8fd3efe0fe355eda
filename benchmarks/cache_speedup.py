"""Speed-up of the clean-context key/value cache for one populate task, measured side by side.

Runs the same populate-stage-two task (targets 13-18, context 0-12 and 19-20, CFG on) twice per
round on the same model and inputs: once with the context cached (built once per task, as mmpl
renders), once with the context recomputed inside every forward pass (the masked reference).
Rounds alternate so that drift in machine load hits both sides alike. Prints the ratio.

    python benchmarks/cache_speedup.py                      # the embedded tiny model, its 96x64 size
    python benchmarks/cache_speedup.py --size 256x160 --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmpl_cli.profiles import Sampler, load_profile
from mmpl_cli.tiny import build_tiny_model
from mmpl_cli.wan import ContextGroup, WanBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the tiny profile's)")
    parser.add_argument("--layers", type=int, default=None, help="build a tiny model with this many layers")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    profile = load_profile("tiny")
    width, height = (map(int, args.size.split("x")) if args.size else (profile.width, profile.height))
    if args.layers:
        root = build_tiny_model(Path(tempfile.mkdtemp()) / "model", num_layers=args.layers)
    else:
        root = profile.resolve_model_path()
    backend = WanBackend.from_folder(root, device=args.device, max_sequence_length=profile.max_sequence_length)
    layout = profile.layout
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(0)

    def latents(n: int) -> torch.Tensor:
        return torch.randn(16, n, h, w, generator=g)

    context = [
        ContextGroup(latents(len(layout.initial)), layout.initial, ()),
        ContextGroup(latents(len(layout.plan.targets)), layout.plan.targets, layout.plan.sees),
        ContextGroup(latents(6), layout.populate_stage_one.targets, layout.populate_stage_one.sees),
    ]
    stage = layout.populate_stage_two
    noise = latents(len(stage.targets))
    text = backend.text("a harbour at dusk, lights coming on", "blurry", 5.0)
    sampler = Sampler(steps=args.steps, guidance=5.0)

    def run(recompute: bool) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        backend.denoise(noise, stage.targets, stage.sees, context, text, sampler, recompute_context=recompute)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(False), run(True)  # warm-up
    cached, recomputed = [], []
    for _ in range(args.rounds):
        cached.append(run(False))
        recomputed.append(run(True))
    result = {
        "model_layers": len(backend.transformer.blocks), "size": f"{width}x{height}", "device": args.device,
        "steps": args.steps, "rounds": args.rounds,
        "cached_s": statistics.median(cached), "recomputed_s": statistics.median(recomputed),
    }
    result["speedup"] = result["recomputed_s"] / result["cached_s"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"populate stage two, {args.steps} steps with CFG, {result['model_layers']} layers, "
              f"{result['size']} on {args.device}: cached {result['cached_s']:.3f} s, "
              f"recomputed {result['recomputed_s']:.3f} s -> cache speed-up x{result['speedup']:.2f} "
              f"(median of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
