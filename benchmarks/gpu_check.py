"""Does mmpl work on this GPU? One command, a few minutes, written for the first time a GPU is at hand.

    python benchmarks/gpu_check.py            # on a CUDA GPU (under 8 minutes on one H100 / H200)
    python benchmarks/gpu_check.py --smoke    # on a CPU, tiny sizes, under a minute (CI keeps it alive)

What it does, with random weights made here (no download):

1. builds the Wan2.1 1.3B architecture at its real width and depth (30 blocks; the text encoder at
   UMT5-XXL's width with 2 layers), or the tiny test model with --smoke;
2. renders a two-segment shot with 4 steps through the real CLI (`python -m mmpl_cli render`) in
   bfloat16 at 832x480, with terminal and with mid-point seeding, with native attention and, when
   flash-attn is installed, with flash;
3. checks that the cached context path agrees with recomputing the context in the same forward
   (the masked reference), within bfloat16's tolerance, on a populate stage-two group;
4. prints per task kind: seconds, peak `torch.cuda.max_memory_allocated` (from the render's event
   log) beside the memory model's figure (mmpl_cli/memory.py), and the peak of each seeding mode,
   and writes them to --json;
5. renders the shot with the few-step sampler of distilled checkpoints (4 steps, no guidance),
   with MMPL's groups and with the `causal` strategy (Self-Forcing's rollout), and prints frames
   per second of the render's tasks.

Exit code 0 when every render finished and the agreement holds; the figures are for the README.
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
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS = ("version: 1\ndefaults: {{steps: {steps}, seed: 7}}\nshots:\n"
         "  - {{id: check, prompt: \"a red boat on a grey sea at dawn\", duration: {duration}}}\n")
FEW_STEP = ("version: 1\ndefaults: {{scheduler: few-step, timesteps: [1000, 750, 500, 250], guidance: 1, seed: 7, "
            "strategy: {strategy}}}\nshots:\n"
            "  - {{id: check, prompt: \"a red boat on a grey sea at dawn\", duration: {duration}}}\n")


def build(folder: Path, smoke: bool) -> tuple[Path, Path]:
    """The model folder and a profile for it (the shipped 1.3B profile, or tiny's with --smoke)."""
    from mmpl_cli.tiny import build_tiny_model, build_wan_model

    model = folder / "model"
    if smoke:
        build_tiny_model(model, seed=1)
        text = (REPO / "profiles" / "tiny.yaml").read_text().replace("  path: builtin:tiny\n", f"  path: {model}\n")
    else:
        build_wan_model(model, "wan2.1-1.3b", num_layers=30, text_layers=2, seed=1)
        text = (REPO / "profiles" / "wan2.1-t2v-1.3b.yaml").read_text().replace(
            "  path: ~/models/Wan2.1-T2V-1.3B-Diffusers\n", f"  path: {model}\n")
    profiles = {}
    for attention in ["native"] + (["flash"] if not smoke and find_spec("flash_attn") else []):
        path = folder / f"profile-{attention}.yaml"
        lines = text.splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith("  dtype:"))
        lines = [line for line in lines if not line.startswith("  attention:")]
        lines.insert(at + 1, f"  attention: {attention}\n")
        path.write_text("".join(lines))
        profiles[attention] = path
    return model, profiles


def render(shots: Path, profile: Path, out: Path, seeding: str, device: str) -> dict:
    """One render through the CLI; per task kind its seconds and peak memory from the event log."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mmpl_cli", "render", str(shots), "--profile", str(profile),
                           "--out", str(out), "--seeding", seeding, "--device", device, "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"render with {profile.name}, {seeding} seeding failed (exit {proc.returncode})")
    from mmpl_cli.store import RenderStore

    events = RenderStore(out).event_log.read()  # every worker's event file, merged
    task_s = sum(e["seconds"] for e in events if e["event"] == "finished")
    kinds: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e["event"] == "finished":
            _, segment, kind = (e["task"].split("/") + ["", ""])[:3] if e["task"].count("/") == 2 else ("", "", "stitch")
            kind = "handover" if kind == "initial" and segment != "s000" else kind
            entry = kinds.setdefault(kind, {"seconds": [], "peak_gb": []})
            entry["seconds"].append(e["seconds"])
            if "peak_gb" in e:
                entry["peak_gb"].append(e["peak_gb"])
    per_kind = {k: {"seconds": round(statistics.mean(v["seconds"]), 3),
                    "peak_gb": max(v["peak_gb"]) if v["peak_gb"] else None} for k, v in kinds.items()}
    peaks = [v["peak_gb"] for v in per_kind.values() if v["peak_gb"] is not None]
    return {"wall_s": round(wall, 2), "task_s": round(task_s, 2), "tasks": per_kind, "peak_gb": max(peaks) if peaks else None}


def memory_model(profile: Path, model: Path, seeding: str, free_gb: float | None) -> dict:
    """The memory model's peak per task kind for this profile and seeding, offloading as `auto` would."""
    from mmpl_cli.memory import estimate
    from mmpl_cli.profiles import load_profile

    found = estimate(load_profile(str(profile)), model, free_gb)
    offloaded = found["resident"][seeding]["peak_gb"] > free_gb if free_gb is not None else False
    tasks = found["offloaded" if offloaded else "resident"][seeding]["tasks"]
    return {kind: v["total_gb"] for kind, v in tasks.items()}


def cache_agreement(model: Path, dtype: str, device: str) -> float:
    """Largest relative difference between the cached and the recomputed context path, one stage-two group."""
    import torch

    from mmpl_cli.profiles import Sampler
    from mmpl_cli.wan import ContextGroup, WanBackend

    backend = WanBackend.from_folder(model, device=device, dtype=dtype, max_sequence_length=64, attention="native")
    z, (h, w) = backend.vae.config.z_dim, ((60, 104) if device.startswith("cuda") else (8, 12))
    g = torch.Generator().manual_seed(0)
    lat = lambda n: torch.randn(z, n, h, w, generator=g)  # noqa: E731
    context = [ContextGroup(lat(2), (0, 1), ()), ContextGroup(lat(7), (2, 3, 10, 11, 12, 19, 20), (0, 1)),
               ContextGroup(lat(6), tuple(range(4, 10)), (0, 1, 2, 3, 10, 11, 12))]
    text = backend.text("a red boat", "", 5.0)
    noise, sees, sampler = lat(6), tuple(range(13)) + (19, 20), Sampler(steps=2, guidance=5.0)
    cached = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler)
    reference = backend.denoise(noise, tuple(range(13, 19)), sees, context, text, sampler, recompute_context=True)
    return float((cached - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes: keeps the script alive in CI")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run with --smoke on a CPU")
    device = "cpu" if args.smoke else "cuda:0"
    work = Path(tempfile.mkdtemp(prefix="mmpl-gpu-check-"))
    started = time.perf_counter()
    model, profiles = build(work, args.smoke)
    built_s = time.perf_counter() - started
    shots = work / "shots.yaml"
    # on the GPU 9 s: two segments (the hand-over too); the smoke run only keeps the script alive: 5 s
    shots.write_text(SHOTS.format(steps=2 if args.smoke else 4, duration=5 if args.smoke else 9))
    result = {"device": torch.cuda.get_device_name(0) if not args.smoke else "cpu (smoke)", "torch": torch.__version__,
              "build_s": round(built_s, 1), "renders": {}}
    free_gb = torch.cuda.mem_get_info(0)[0] / 1e9 if not args.smoke else None
    for attention, profile in profiles.items():
        for seeding in ("terminal", "midpoint"):
            name = f"{attention}/{seeding}"
            result["renders"][name] = render(shots, profile, work / name.replace("/", "-"), seeding, device)
            r = result["renders"][name]
            predicted = memory_model(profile, model, seeding, free_gb)
            r["model_gb"] = {kind: predicted.get(kind) for kind in r["tasks"]}
            print(f"{name}: {r['wall_s']} s, peak {r['peak_gb']} GB", flush=True)
            for kind, v in r["tasks"].items():
                print(f"    {kind:<20} {v['seconds']:8.2f} s   peak {v['peak_gb']} GB   memory model {predicted.get(kind)} GB")
    duration = 1 if args.smoke else 9  # the smoke run: one segment each, to keep the script alive
    # distilled checkpoints' sampler: frames per second of the render's tasks (the smoke run: causal alone)
    for strategy in ("causal",) if args.smoke else ("mmpl", "causal"):
        few = work / f"few-step-{strategy}.yaml"
        few.write_text(FEW_STEP.format(strategy=strategy, duration=duration))
        r = render(few, profiles["native"], work / f"few-step-{strategy}", "terminal", device)
        r["frames_per_s"] = round(duration * 16 / r["task_s"], 2)  # both profiles: 16 fps
        result["renders"][f"few-step/{strategy}"] = r
        print(f"few-step/{strategy}: {r['frames_per_s']} frames/s ({duration * 16} frames, tasks {r['task_s']} s, "
              f"wall {r['wall_s']} s), peak {r['peak_gb']} GB", flush=True)
    tolerance = 2e-2 if not args.smoke else 1e-4  # bfloat16 on the GPU; float32 on the CPU
    agreement = cache_agreement(model, "float32" if args.smoke else "bfloat16", device)
    result["cache_vs_recomputed_rel"] = agreement
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(f"cached vs recomputed context: {agreement:.2e} relative (tolerance {tolerance:g})")
    print(f"total {result['total_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if agreement > tolerance:
        raise SystemExit("the cached context path disagrees with the reference")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
