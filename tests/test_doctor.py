"""`mmpl doctor` tells the truth about this machine and about each profile's weights."""

from __future__ import annotations

import pytest
import json
from pathlib import Path
from importlib.util import find_spec

import imageio_ffmpeg
import torch

from conftest import run_cli


@pytest.mark.slow
def test_doctor_json_reports_this_machine(tiny_model_dir, tmp_path):
    partial = tmp_path / "partial"
    (partial / "transformer").mkdir(parents=True)
    (partial / "transformer" / "config.json").write_text("{}")
    env = {"MMPL_WAN21_T2V_1_3B": str(partial), "MMPL_WAN21_T2V_14B": str(tiny_model_dir)}
    proc = run_cli("doctor", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    assert report["packages"]["torch"] and report["torch"]["version"] == torch.__version__
    assert report["packages"]["diffusers"] and report["python"]["version"].startswith("3.")
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["ffmpeg"]["found"] and report["ffmpeg"]["path"] == imageio_ffmpeg.get_ffmpeg_exe()
    assert report["ffmpeg"]["version"]
    flash = find_spec("flash_attn") is not None
    assert report["attention"]["flash_attn_installed"] == flash
    assert report["attention"]["auto_chooses"] == ("flash" if flash and report["gpus"] else "native")

    profiles = {p["name"]: p for p in report["profiles"]}
    assert set(profiles) == {"tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "self-forcing-dmd-1.3b"}
    assert profiles["tiny"]["present"] and profiles["tiny"]["missing"] == []
    small = profiles["wan2.1-t2v-1.3b"]
    assert not small["present"] and small["model_path"] == str(partial)
    assert small["looked_in"] == "$MMPL_WAN21_T2V_1_3B"
    assert small["missing"] == ["transformer/*.safetensors", "vae/config.json", "vae/*.safetensors",
                                "text_encoder/config.json", "text_encoder/*.safetensors", "tokenizer/tokenizer_config.json"]
    big = profiles["wan2.1-t2v-14b"]
    assert big["present"] and big["model_path"] == str(tiny_model_dir)
    distilled = profiles["self-forcing-dmd-1.3b"]  # the 1.3B folder (partial here) and Self-Forcing's .pt: both missing
    assert not distilled["present"] and distilled["missing"] == small["missing"]
    assert distilled["transformer_checkpoint"] == {"path": str(Path("~/models/Self-Forcing/checkpoints/self_forcing_dmd.pt")
                                                                .expanduser()), "present": False,
                                                   "path_env": "MMPL_SELF_FORCING_DMD", "key": "generator_ema"}


@pytest.mark.slow
def test_doctor_text_and_a_missing_folder(tmp_path):
    env = {"MMPL_WAN21_T2V_1_3B": str(tmp_path / "nowhere")}
    proc = run_cli("doctor", "--profile", "wan2.1-t2v-1.3b", "--profile", "tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"profile wan2.1-t2v-1.3b: weights MISSING ({tmp_path / 'nowhere'}, from $MMPL_WAN21_T2V_1_3B)" in out
    assert "missing: the folder itself" in out
    assert "profile tiny: weights present" in out and "wan2.1-t2v-14b" not in out
    assert "ffmpeg: " in out and "NOT FOUND" not in out
    if not torch.cuda.is_available():
        assert "GPU: none" in out


@pytest.mark.slow
def test_doctor_fails_without_ffmpeg():
    proc = run_cli("doctor", "--json", env={"IMAGEIO_FFMPEG_EXE": "/bin/false"})
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ffmpeg"]["found"] is False
