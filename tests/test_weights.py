"""Real weights: transformer checkpoints in the training repositories' layout (MMPL, Self-Forcing),
read safely and converted with diffusers' own converter; attention backends; offloading."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, run_cli
from mmpl_cli.errors import InputError

# diffusers' names -> the original Wan names (the inverse of diffusers' converter, written out here
# from the original model's module names so that the test does not trust the code it checks).
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def original_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", key)
    key = re.sub(r"\.norm2\.", ".@.", key).replace(".norm3.", ".norm2.").replace(".@.", ".norm3.")
    for new, old in TO_ORIGINAL:
        key = key.replace(new, old)
    return key


def transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder / "transformer").state_dict()


@pytest.fixture(scope="module")
def other_folder(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model folder with a different (freshly initialised) transformer."""
    from diffusers import WanTransformer3DModel

    from mmpl_cli.tiny import TRANSFORMER_CONFIG

    dest = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_model_dir, dest)
    torch.manual_seed(7)
    shutil.rmtree(dest / "transformer")
    WanTransformer3DModel(**TRANSFORMER_CONFIG).save_pretrained(dest / "transformer", safe_serialization=True)
    return dest


@pytest.fixture(scope="module")
def original_pt(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny transformer as an MMPL / Self-Forcing checkpoint: {"generator": {"model.<original key>": t}},
    beside an EMA entry of other weights (as training saves both)."""
    state = transformer_state(tiny_model_dir)
    path = tmp_path_factory.mktemp("ckpt") / "mmpl.pt"
    torch.save({"generator": {f"model.{original_name(k)}": v for k, v in state.items()},
                "generator_ema": {f"model.{original_name(k)}": v * 0.5 for k, v in state.items()}, "step": 1200}, path)
    return path


def profile_with(tmp: Path, model: Path, transformer: str = "") -> Path:
    text = (REPO / "profiles" / "tiny.yaml").read_text()
    text = text.replace("  path: builtin:tiny\n", f"  path: {model}\n{transformer}")
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "profile.yaml"
    path.write_text(text)
    return path


SHOT = "version: 1\ndefaults: {steps: 2, seed: 3}\nshots:\n  - {id: a, prompt: \"a red boat\", duration: 1}\n"


@pytest.mark.slow
def test_original_layout_pt_renders_the_same_frames_as_the_diffusers_folder(
        tiny_model_dir, other_folder, original_pt, tmp_path):
    from mmpl_cli.video import read_frames

    shots = tmp_path / "shots.yaml"
    shots.write_text(SHOT)
    assert original_name("blocks.0.attn1.to_q.weight") == "blocks.0.self_attn.q.weight"
    assert any(k.startswith("model.blocks.0.norm3") for k in torch.load(original_pt, weights_only=True)["generator"])
    # the other folder's own transformer really is different, so only the checkpoint can make them equal
    assert not torch.equal(transformer_state(other_folder)["proj_out.weight"],
                           transformer_state(tiny_model_dir)["proj_out.weight"])

    folder_profile = profile_with(tmp_path / "p1", tiny_model_dir)
    ckpt_profile = profile_with(tmp_path / "p2", other_folder, f"  transformer: {{path: {original_pt}}}\n")  # key: auto
    a = run_cli("render", str(shots), "--profile", str(folder_profile), "--out", str(tmp_path / "a"))
    b = run_cli("render", str(shots), "--profile", str(ckpt_profile), "--out", str(tmp_path / "b"))
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert ("transformer from mmpl.pt: entry 'generator' (the file also holds generator_ema; "
            "model.transformer.key picks another), original naming") in b.stdout
    frames_a, frames_b = read_frames(tmp_path / "a" / "a.mp4"), read_frames(tmp_path / "b" / "a.mp4")
    assert frames_a.shape == frames_b.shape and frames_a.shape[0] == 16
    assert (frames_a == frames_b).all()


@pytest.mark.slow
def test_a_pickled_object_is_refused_before_anything_is_written(tiny_model_dir, original_pt, tmp_path):
    state = torch.load(original_pt, weights_only=True)
    evil = tmp_path / "with-config.pt"
    torch.save({**state, "config": argparse.Namespace(lr=1e-5)}, evil)
    shots = tmp_path / "shots.yaml"
    shots.write_text(SHOT)
    profile = profile_with(tmp_path, tiny_model_dir, f"  transformer: {{path: {evil}}}\n")
    out = tmp_path / "out"
    proc = run_cli("render", str(shots), "--profile", str(profile), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "refused: the file holds pickled Python objects" in proc.stderr
    assert "argparse.Namespace" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_entry_selection_naming_and_wrappers(tiny_model_dir, tmp_path):
    from mmpl_cli.weights import read_transformer_checkpoint, verify_checkpoint

    state = transformer_state(tiny_model_dir)
    ema = {k: v + 1 for k, v in state.items()}
    path = tmp_path / "both.pt"
    # FSDP-wrapped names in the EMA entry, as Self-Forcing's training saves them
    torch.save({"generator": {f"model.{original_name(k)}": v for k, v in state.items()},
                "generator_ema": {f"model._fsdp_wrapped_module.{original_name(k)}": v for k, v in ema.items()}}, path)
    auto, what = read_transformer_checkpoint(path)  # as MMPL's inference scripts: 'generator', not its EMA
    assert "entry 'generator' (the file also holds generator_ema; model.transformer.key picks another)" in what
    assert set(auto) == set(state) and all(torch.equal(auto[k], state[k]) for k in state)
    ema_only, what = read_transformer_checkpoint(path, key="generator_ema")
    assert all(torch.equal(ema_only[k], ema[k]) for k in state) and "also holds" not in what
    ddp = tmp_path / "ddp.pt"
    torch.save({"generator": {f"module.model.{original_name(k)}": v for k, v in state.items()}}, ddp)
    assert set(read_transformer_checkpoint(ddp)[0]) == set(state)
    with pytest.raises(InputError, match="no state dict under 'generator_emma'.*generator, generator_ema"):
        read_transformer_checkpoint(path, key="generator_emma")

    flat = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, flat)
    loaded, what = read_transformer_checkpoint(flat)
    assert "diffusers naming" in what and all(torch.equal(loaded[k], state[k]) for k in state)
    assert "diffusers naming" in verify_checkpoint(tiny_model_dir, flat)  # from the header alone
    save_file({k: (v if k != "proj_out.weight" else v[:8]).contiguous() for k, v in state.items()}, flat)
    with pytest.raises(InputError, match=r"proj_out.weight \(8, 96\) != model \(64, 96\)"):
        verify_checkpoint(tiny_model_dir, flat)


def test_mismatched_keys_and_shapes_are_named(tiny_model_dir, tmp_path):
    from mmpl_cli.weights import verify_checkpoint

    state = {original_name(k): v for k, v in transformer_state(tiny_model_dir).items()}
    del state["blocks.1.self_attn.q.weight"]
    state["blocks.9.self_attn.q.weight"] = torch.zeros(1)
    state["head.head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"generator": state}, path)
    with pytest.raises(InputError) as info:
        verify_checkpoint(tiny_model_dir, path)
    message = str(info.value)
    assert "1 missing: blocks.1.attn1.to_q.weight" in message
    assert "1 unexpected: blocks.9.attn1.to_q.weight" in message
    assert "1 with another shape: proj_out.weight (3, 3) != model (64, 96)" in message
    assert "1.3B or 14B" in message


def test_attention_backend_and_offload_choices():
    from mmpl_cli.wan import decide_offload, resolve_attention

    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "native"  # no GPU here
    assert resolve_attention("native", cpu, torch.float32) == "native"
    with pytest.raises(InputError, match="needs bfloat16 or float16"):
        resolve_attention("flash", torch.device("cuda"), torch.float32)
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        resolve_attention("sage", cpu, torch.bfloat16)
    assert decide_offload("always", cpu, None) is False  # nothing to offload from on the CPU
    assert decide_offload("never", torch.device("cuda"), 1e9) is False


def test_flash_attention_without_the_package_is_refused_early(tmp_path, tiny_model_dir):
    from importlib.util import find_spec

    if find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    shots = tmp_path / "shots.yaml"
    shots.write_text(SHOT)
    text = (REPO / "profiles" / "tiny.yaml").read_text().replace("  dtype: float32\n", "  dtype: bfloat16\n  attention: flash\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(text.replace("builtin:tiny", str(tiny_model_dir)))
    proc = run_cli("render", str(shots), "--profile", str(profile), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "model.attention" in proc.stderr and "flash_attn, which is not installed" in proc.stderr
    assert "mmpl-cli[flash]" in proc.stderr and not (tmp_path / "o").exists()
