"""One planning task on the Wan2.1-1.3B architecture (random weights): our primitive against diffusers'
transformer forward on the same frames, with each attention backend, side by side in one run.

The planning group denoises latents 2-3, 10-12 and 19-20 (7 latents) while seeing the clean initial
latents 0-1. Our primitive runs the 2 context latents once into a key/value cache and then only the
7 targets per evaluation; diffusers' `WanTransformer3DModel.forward` runs all 9 latents every time.
Both are timed for one evaluation and for the whole task (`--steps` steps, CFG doubles them).

    python benchmarks/planning_task.py                         # GPU: 1.3B architecture, 832x480, bf16
    python benchmarks/planning_task.py --arch tiny --device cpu --steps 2   # a smoke run anywhere

Writes the figures as JSON to benchmarks/results/planning_task-<device>.json with --save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from mmpl_cli.tiny import TRANSFORMER_CONFIG
from mmpl_cli.wan import ContextCache, _active, _Session, install_engine_modules

# Wan2.1-T2V-1.3B's transformer config (its Diffusers folder's transformer/config.json).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PLAN_TARGETS, PLAN_SEES = (2, 3, 10, 11, 12, 19, 20), (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["1.3b", "tiny"], default="1.3b")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    config = WAN_1_3B if args.arch == "1.3b" else TRANSFORMER_CONFIG
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).eval().requires_grad_(False)
        model.to(dtype)
    for name, module in model.named_modules():  # what from_pretrained(torch_dtype=...) keeps in float32
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules):
            module.float()
    install_engine_modules(model)
    width, height = map(int, args.size.split("x"))
    h, w = height // 8, width // 8
    tokens_per_latent = (h // 2) * (w // 2)
    text = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    context = torch.randn(1, 16, len(PLAN_SEES), h, w, device=device, dtype=dtype)
    targets = torch.randn(1, 16, len(PLAN_TARGETS), h, w, device=device, dtype=dtype)
    joint = torch.cat([context, targets], dim=2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timestep(latents: int, t: float) -> torch.Tensor:
        return torch.full((1, latents * tokens_per_latent), t, device=device)

    def ours_cache() -> ContextCache:
        cache = ContextCache(len(model.blocks), PLAN_SEES, tokens_per_latent)
        cache.begin(PLAN_SEES)
        with _active(_Session(frames=torch.tensor(PLAN_SEES), record_into=cache)):
            model(context, timestep(len(PLAN_SEES), 0.0), text, return_dict=False)
        return cache

    def ours_step(view) -> None:
        with _active(_Session(frames=torch.tensor(PLAN_TARGETS), context=view)):
            model(targets, timestep(len(PLAN_TARGETS), 500.0), text, return_dict=False)

    def diffusers_step() -> None:  # stock forward (no session): all 9 latents, positions 0..8
        model(joint, timestep(joint.shape[2], 500.0), text, return_dict=False)

    def timed(fn, *a) -> float:
        sync()
        start = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - start

    backends = ["native"] + (["flash"] if device.type == "cuda" and find_spec("flash_attn") and dtype != torch.float32 else [])
    results = {"arch": args.arch, "size": args.size,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": args.dtype, "steps": args.steps, "tokens_per_latent": tokens_per_latent, "backends": {}}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "attention backends are an experimental feature"
    for name in backends:
        model.set_attention_backend(name)
        with torch.no_grad():
            view = ours_cache().visible(PLAN_SEES)
            ours_step(view), diffusers_step()  # warm-up
            cache_s = statistics.median(timed(ours_cache) for _ in range(args.rounds))
            ours_s = statistics.median(timed(ours_step, view) for _ in range(args.rounds))
            stock_s = statistics.median(timed(diffusers_step) for _ in range(args.rounds))
        evaluations = 2 * args.steps  # classifier-free guidance: cond and uncond
        results["backends"][name] = {
            "ours_step_s": ours_s, "diffusers_step_s": stock_s, "step_speedup": stock_s / ours_s,
            "ours_task_s": 2 * cache_s + evaluations * ours_s, "diffusers_task_s": evaluations * stock_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }
    if "flash" in results["backends"]:
        results["flash_over_native_task"] = (results["backends"]["native"]["ours_task_s"]
                                             / results["backends"]["flash"]["ours_task_s"])
    print(json.dumps(results, indent=2))
    if args.save:
        out = Path(__file__).parent / "results" / f"planning_task-{device.type}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
