"""`mmpl doctor`: what this machine has for rendering, and what each profile still lacks.

Reports facts only; reading them imports torch (for the GPUs) but loads no weights.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec

PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "imageio-ffmpeg", "flash-attn")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append({"index": i, "name": props.name, "total_gb": round(total / 1e9, 2), "free_gb": round(free / 1e9, 2),
                    "compute_capability": f"{props.major}.{props.minor}"})
    return out


def ffmpeg() -> dict:
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        return {"found": False, "path": None, "version": None, "error": str(exc)}
    try:
        first = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
        version = first[0].split()[2] if first and len(first[0].split()) > 2 else None
    except (OSError, subprocess.SubprocessError) as exc:
        return {"found": False, "path": exe, "version": None, "error": str(exc)}
    return {"found": version is not None, "path": exe, "version": version,
            "source": "IMAGEIO_FFMPEG_EXE" if os.environ.get("IMAGEIO_FFMPEG_EXE") else "imageio-ffmpeg"}


def profile_report(name_or_path: str) -> dict:
    """Whether a profile's weights are present; if not, which files are missing and where we looked."""
    from mmpl_cli.errors import InputError
    from mmpl_cli.profiles import load_profile

    try:
        profile = load_profile(name_or_path)
    except InputError as exc:
        return {"name": name_or_path, "file": None, "ok": False, "error": str(exc)}
    root = profile.resolve_model_path()
    missing = profile.missing_model_files()
    report = {
        "name": profile.name, "file": profile.source, "dtype": profile.dtype, "attention": profile.attention,
        "model_path": str(root), "looked_in": profile.model_path_origin(),
        "path_env": profile.model_path_env, "present": not missing,
        "missing": [] if not missing else (["the folder itself"] if missing == [str(root)] else missing),
    }
    checkpoint = profile.resolve_checkpoint()
    if checkpoint is not None:
        report["transformer_checkpoint"] = {"path": str(checkpoint), "present": checkpoint.is_file(),
                                            "path_env": profile.checkpoint.path_env, "key": profile.checkpoint.key}
        report["present"] = report["present"] and checkpoint.is_file()
    report["ok"] = True
    return report


def collect(profiles: list[str] | None = None) -> dict:
    import torch

    from mmpl_cli import __version__
    from mmpl_cli.profiles import list_profiles

    found_gpus = gpus()
    flash = find_spec("flash_attn") is not None
    return {
        "mmpl": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": {"version": torch.__version__, "cuda_available": torch.cuda.is_available(),
                  "cuda_build": torch.version.cuda, "cpu_threads": torch.get_num_threads()},
        "gpus": found_gpus,
        "ffmpeg": ffmpeg(),
        "attention": {
            "flash_attn_installed": flash,
            "auto_chooses": "flash" if flash and found_gpus else "native",
            "why": ("flash-attn is installed and a GPU is present (bfloat16/float16 profiles)" if flash and found_gpus
                    else "no GPU" if not found_gpus else "flash-attn is not installed (pip install 'mmpl-cli[flash]')"),
        },
        "profiles": [profile_report(p) for p in (profiles or list_profiles())],
    }


def render_text(report: dict) -> list[str]:
    lines = [f"mmpl {report['mmpl']} on Python {report['python']['version']} ({report['platform']})"]
    pk = report["packages"]
    lines.append("packages: " + ", ".join(f"{k} {v}" if v else f"{k} (not installed)" for k, v in pk.items()))
    if report["gpus"]:
        for g in report["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']}, {g['free_gb']:.1f} of {g['total_gb']:.1f} GB free, "
                         f"compute {g['compute_capability']}")
    else:
        lines.append(f"GPU: none (torch {report['torch']['version']}, CUDA available: no); rendering runs on the CPU")
    ff = report["ffmpeg"]
    lines.append(f"ffmpeg: {ff['version']} at {ff['path']}" if ff["found"] else f"ffmpeg: NOT FOUND ({ff.get('error')})")
    att = report["attention"]
    lines.append(f"attention: auto chooses {att['auto_chooses']} ({att['why']})")
    for p in report["profiles"]:
        if not p["ok"]:
            lines.append(f"profile {p['name']}: cannot read it: {p['error']}")
            continue
        state = "weights present" if p["present"] else "weights MISSING"
        lines.append(f"profile {p['name']}: {state} ({p['model_path']}, from {p['looked_in']})")
        if p["missing"]:
            lines.append(f"    missing: {', '.join(p['missing'])}")
            if p["path_env"]:
                lines.append(f"    point {p['path_env']} or --model-path at a Diffusers-format Wan folder")
        ck = p.get("transformer_checkpoint")
        if ck:
            lines.append(f"    transformer checkpoint: {ck['path']} ({'present' if ck['present'] else 'MISSING'})")
    return lines


def healthy(report: dict) -> bool:
    """ffmpeg works and the embedded default can render: what `mmpl render examples/shots.yaml` needs."""
    default = next((p for p in report["profiles"] if p.get("name") == "tiny"), None)
    return report["ffmpeg"]["found"] and (default is None or default.get("present", False))
