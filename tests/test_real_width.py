"""The released architectures at their real widths, depth cut so a CPU can run them: Wan2.1 1.3B
(dim 1536, 12 heads, FFN 8960) and 14B (dim 5120, 40 heads, FFN 13824) transformers, UMT5-XXL's
encoder width (4096) and the Wan2.1 VAE, random weights made here, rendered through `mmpl render`
with the shipped Wan profile at a small size: what users run, not only the tiny default."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from test_weights import original_name, transformer_state

SHOT = 'version: 1\ndefaults: {seed: 3}\nshots:\n  - {id: a, prompt: "a red boat on a grey sea", duration: 5}\n'


def wan_profile(folder: Path, model: Path, dtype: str, transformer: str = "") -> Path:
    """The shipped 1.3B profile, pointed at `model`, at 32x32 with 2 steps (one 81-frame segment)."""
    text = (REPO / "profiles" / "wan2.1-t2v-1.3b.yaml").read_text()
    for old, new in (("  path: ~/models/Wan2.1-T2V-1.3B-Diffusers\n", f"  path: {model}\n{transformer}"),
                     ("  dtype: bfloat16\n", f"  dtype: {dtype}\n"), ("  width: 832\n", "  width: 32\n"),
                     ("  height: 480\n", "  height: 32\n"), ("  steps: 50\n", "  steps: 2\n"),
                     ("  guidance: 5.0\n", "  guidance: 2.0\n"), ("  max_sequence_length: 512\n", "  max_sequence_length: 32\n")):
        assert old in text, old
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.yaml").write_text(text)
    (folder / "shots.yaml").write_text(SHOT)
    return folder / "profile.yaml"


def render(tmp: Path, profile: Path) -> tuple[np.ndarray, str]:
    from mmpl_cli.video import read_frames

    proc = run_cli("render", str(profile.parent / "shots.yaml"), "--profile", str(profile), "--out", str(tmp / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_frames(tmp / "out" / "a.mp4"), proc.stdout


@pytest.fixture(scope="module")
def float32_render(wan13, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan13-float32")
    return render(tmp, wan_profile(tmp, wan13, "float32"))


@pytest.mark.slow
def test_wan_1_3b_at_real_width_in_float32(float32_render):
    frames, log = float32_render
    assert frames.shape == (80, 32, 32, 3)  # 5 s at 16 fps, one segment
    assert "(float32); attention native" in log
    assert frames.astype(float).std() > 1.0  # random weights draw something, not one flat colour


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["wan2.1-1.3b", "wan2.1-14b"])
def test_wan_at_real_width_in_bfloat16(arch, wan13, wan14, tmp_path):
    frames, log = render(tmp_path, wan_profile(tmp_path, wan13 if arch == "wan2.1-1.3b" else wan14, "bfloat16"))
    assert frames.shape == (80, 32, 32, 3)  # 5 s at 16 fps, one segment
    assert "(bfloat16); attention native" in log
    assert frames.astype(float).std() > 1.0


@pytest.mark.slow
def test_original_layout_pt_at_real_width_gives_the_folders_frames(wan13, float32_render, tmp_path):
    """The 1.3B transformer saved as an MMPL / Self-Forcing checkpoint ({"generator_ema": {"model.<original
    name>": tensor}}) over a folder whose own transformer is another one renders the same frames."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.memory import WAN_TRANSFORMERS

    other = tmp_path / "other"
    shutil.copytree(wan13, other, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(99)
    WanTransformer3DModel(**{**WAN_TRANSFORMERS["wan2.1-1.3b"], "num_layers": 2}).save_pretrained(
        other / "transformer", safe_serialization=True)
    state = transformer_state(wan13)
    assert not torch.equal(transformer_state(other)["proj_out.weight"], state["proj_out.weight"])
    pt = tmp_path / "mmpl_t2v.pt"
    torch.save({"generator_ema": {f"model.{original_name(k)}": v for k, v in state.items()}}, pt)
    frames, log = render(tmp_path, wan_profile(tmp_path, other, "float32", f"  transformer: {{path: {pt}}}\n"))
    assert "transformer from mmpl_t2v.pt: entry 'generator_ema', original naming" in log
    assert (frames == float32_render[0]).all()
