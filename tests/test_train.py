"""`mmpl train`: the loss falls, freezing freezes. (A killed run resuming to the same weights:
tests/test_train_scale.py, with two processes, killed under accelerate and resumed under torchrun.)"""

from __future__ import annotations

import pytest
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import run_cli

CONFIG = """version: 1
out: {out}
model: new
profile: tiny
seed: 3
stages:
{stages}
"""
TRANSFORMER_60 = ("  - {stage: transformer, steps: 60, lr: 1e-3, checkpoint_every: 10, pool: 2,\n"
                  "     groups: [initial, plan, populate_stage_one, populate_stage_two, continuation, full, progressive]}")


def write_config(folder: Path, stages: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.yaml"
    path.write_text(CONFIG.format(out=folder / "run", stages=stages))
    return path


def transformer_weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(next((model / "transformer").glob("*.safetensors")))


@pytest.mark.slow
def test_loss_falls(tmp_path):
    whole = write_config(tmp_path / "whole", TRANSFORMER_60)
    proc = run_cli("train", str(whole))
    assert proc.returncode == 0, proc.stderr
    losses = torch.load(tmp_path / "whole/run/stage1-transformer/checkpoint.pt", weights_only=True)["losses"]
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.85 * first, (first, last)


@pytest.mark.slow
def test_self_attention_training_changes_only_self_attention(tmp_path):
    from mmpl_cli.procedural import vocabulary
    from mmpl_cli.tiny import build_tiny_model
    from mmpl_cli.train import load_train_config, train

    config = write_config(tmp_path, "  - {stage: vae, steps: 3, lr: 1e-3, frames: 5, batch: 2, anchor: 2}\n"
                                    "  - {stage: vae, steps: 2, lr: 1e-4, frames: 13, window: 1, anchor_weight: 0.1}\n"
                                    "  - {stage: transformer, steps: 3, lr: 1e-2, trainable: self_attention, pool: 1}")
    messages = []
    model = train(load_train_config(config), lambda *a: None, messages.append)
    before = build_tiny_model(tmp_path / "initial", seed=3, vocabulary=vocabulary())
    old, new = transformer_weights(before), transformer_weights(model)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    attention = {k for k in old if ".attn1." in k}
    assert changed == attention, sorted(changed ^ attention)
    old_vae = load_file(before / "vae" / "diffusion_pytorch_model.safetensors")
    new_vae = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(old_vae[k], new_vae[k]) for k in old_vae)  # the VAE stage trained too
    # and measured its own latent statistics in place of Wan's
    old_cfg, new_cfg = (json.loads((m / "vae" / "config.json").read_text()) for m in (before, model))
    assert len(new_cfg["latents_std"]) == 16 and new_cfg["latents_std"] != old_cfg["latents_std"]
    assert any("latent statistics from 32 clips" in m for m in messages)
    assert any("trainable parameters (self_attention)" in m for m in messages)
    old_text, new_text = (load_file(m / "text_encoder/model.safetensors") for m in (before, model))
    assert old_text.keys() == new_text.keys()
    assert all(torch.equal(old_text[k], new_text[k]) for k in old_text)


def test_the_text_encoder_trains_only_when_asked(tmp_path):
    from mmpl_cli.procedural import vocabulary
    from mmpl_cli.tiny import build_tiny_model
    from mmpl_cli.train import load_train_config, train

    config = write_config(tmp_path, "  - {stage: transformer, steps: 3, lr: 1e-2, trainable: qk, text_encoder: true, "
                                    "pool: 1, groups: [initial, progressive]}")
    messages = []
    model = train(load_train_config(config), lambda *a: None, messages.append)
    before = build_tiny_model(tmp_path / "initial", seed=3, vocabulary=vocabulary())
    old, new = (load_file(m / "text_encoder/model.safetensors") for m in (before, model))
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert old.keys() == new.keys() and len(changed) >= 0.8 * len(old), changed
    assert any("(qk, and the text encoder)" in m for m in messages)


def test_anchor_latents_carry_each_cell_colour():
    """The anchor latents of a VAE trained from scratch: an orthogonal mix of cell colours, so the
    colour of every 8x8 cell (the first frame alone, then 4 frames at a time) can be read back."""
    from mmpl_cli.recipe import anchor_latents

    torch.manual_seed(0)
    cells = torch.rand(2, 3, 3, 8, 12) * 2 - 1  # colours of (first frame, 4 frames, 4 frames) x 8 x 12 cells
    pixels = torch.cat([cells[:, :, :1], cells[:, :, 1:].repeat_interleave(4, 2)], 2)
    pixels = pixels.repeat_interleave(8, 3).repeat_interleave(8, 4)  # [2, 3, 9, 64, 96]
    z = anchor_latents(pixels, 16)
    assert z.shape == (2, 16, 3, 8, 12)
    mix, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    unmixed = torch.einsum("dc,bdthw->bcthw", mix, z) / 2.5
    torch.testing.assert_close(unmixed[:, :3] / 1.5, cells, atol=1e-4, rtol=0)
    assert unmixed[:, 3:].abs().max() < 1e-4  # uniform cells: no detail within them (float32 rounding aside)
    assert 0.3 < float(z.std()) < 3.0  # about unit scale, so the decoder sees them


def test_detail_weight_makes_the_pixels_of_a_shape_count():
    """An error confined to a shape covering fraction p of the frame costs e·p with plain L1; with
    detail weight w the shape's pixels weigh 1 + w, so it costs e·p(1 + w) / (1 + w·p)."""
    from mmpl_cli.recipe import reconstruction_loss

    pixels = torch.full((1, 3, 2, 16, 16), -0.5)
    pixels[:, 1] = 0.8  # a coloured background
    pixels[:, :, :, 4:8, 4:8] = torch.tensor([0.9, -0.9, 0.2])[None, :, None, None, None]  # a 4x4 shape: p = 1/16
    blurred = pixels.clone()
    blurred[:, :, :, 4:8, 4:8] = pixels[0, :, 0, 0, 0][None, :, None, None, None]  # the shape drawn as background
    e, p = float((pixels - blurred)[:, :, 0, 4, 4].abs().mean()), 1 / 16
    assert reconstruction_loss(pixels, pixels, 20.0) == 0
    torch.testing.assert_close(reconstruction_loss(blurred, pixels, 0.0), torch.tensor(e * p))
    torch.testing.assert_close(reconstruction_loss(blurred, pixels, 20.0), torch.tensor(e * p * 21 / (1 + 20 * p)))
    background_error = pixels + 0.1
    torch.testing.assert_close(reconstruction_loss(background_error, pixels, 20.0), torch.tensor(0.1))


@pytest.mark.slow
def test_chunked_reconstruction_is_diffusers_encode_and_decode_window_by_window():
    """Training on a window of a long clip sees exactly what rendering computes there: the causal
    caches carried from the clip's start."""
    from diffusers import AutoencoderKLWan

    from mmpl_cli.tiny import VAE_CONFIG
    from mmpl_cli.recipe import chunked_reconstruction

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()
    x = torch.rand(1, 3, 17, 64, 96) * 2 - 1  # 5 latents
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        decoded = vae.decode(z).sample
        whole = chunked_reconstruction(vae, x, 0, 5)
        middle = chunked_reconstruction(vae, x, 2, 2)  # latents 2-3, frames 5-12
    torch.testing.assert_close(whole[0], z, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[1].clamp(-1, 1), decoded, atol=1e-5, rtol=0)
    torch.testing.assert_close(middle[0], z[:, :, 2:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(middle[1].clamp(-1, 1), decoded[:, :, 5:13], atol=1e-5, rtol=0)
    assert torch.equal(middle[2], x[:, :, 5:13])


@pytest.mark.slow
def test_clips_that_begin_their_video_move_the_way_their_caption_says():
    """Why the groups that begin a shot (initial, full) train on clips with first == 0 only: there the
    shape moves as the caption says; a later window may show it after a bounce, moving back."""
    from mmpl_cli import procedural
    from mmpl_cli.dataset import ClipSource

    source = ClipSource("procedural", 96, 64, seed=0, relative_to=Path("."))
    agree: dict[bool, list[bool]] = {True: [], False: []}
    for i in range(60):
        clip = source.clip(i, 17)
        scene = procedural.scene_from_caption(clip.caption)
        agree[clip.first == 0].append(procedural.judge(clip.frames, scene)["direction_ok"])
    assert len(agree[True]) >= 10 and all(agree[True])
    assert len(agree[False]) >= 10 and sum(agree[False]) <= 0.8 * len(agree[False])  # 29 of 43 agree


def test_parameter_subsets_follow_table_3():
    from mmpl_cli.recipe import trainable_names

    names = ["blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_k.bias", "blocks.0.attn1.to_v.weight",
             "blocks.0.attn1.to_out.0.weight", "blocks.0.attn2.to_q.weight", "blocks.0.ffn.net.2.weight", "proj_out.weight"]
    assert trainable_names(names, "all") == names
    assert trainable_names(names, "self_attention") == names[:4]
    assert trainable_names(names, "qk") == names[:2]


@pytest.mark.slow
def test_bad_training_config_is_reported(tmp_path):
    config = write_config(tmp_path, "  - {stage: transformer, steps: 0, trainable: attention}")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{config}:7: stages[0].steps: expected a number >= 1" in proc.stderr
    assert "stages[0].trainable: expected one of all, self_attention, qk, found 'attention'" in proc.stderr
    config = write_config(tmp_path, "  - {stage: vae, steps: 1, frames: 9, window: 4, detail_weight: -1}\n"
                                    "  - {stage: vae, steps: 1, frames: 9, window: 1, anchor: 1}")
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert "stages[0].window: expected at most the 3 latents of a 9-frame clip, found 4" in proc.stderr
    assert "stages[1].window: expected no anchored steps (anchor) in a windowed stage" in proc.stderr
    assert "stages[0].detail_weight: expected a number >= 0" in proc.stderr
    assert not (tmp_path / "run").exists()
