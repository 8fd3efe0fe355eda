"""A task whose output is not finite (NaN or inf) fails with a message and saves nothing: saved, it
would be reused as finished work by every resume (before: a black video and exit 0).

Within the sampler's stated ranges (guidance <= 100, shift <= 100) the tiny models stay finite
(guidance 1e38, refused now as bad input, gave NaN), so the overflow here comes from a test-built
model whose output layer is scaled up, as a broken checkpoint or a half-precision overflow would give."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from conftest import run_cli, videos


@pytest.mark.slow
def test_non_finite_latents_fail_the_task_and_save_nothing(shots_file, tiny_model_dir, reference_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.weight"] = tensors["proj_out.weight"] * 1e38  # overflows to inf in the first forward
    save_file(tensors, weights)
    out = tmp_path / "out"
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(broken))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "k/s000/initial: the model's output is not finite (NaN or inf), so nothing was saved" in proc.stderr
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("*.mp4"))
    # the same folder with a sane model completes
    proc = run_cli("render", str(shots_file), "--out", str(out), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert videos(out) == videos(reference_dir)


def test_sampler_values_out_of_range_are_bad_input(tmp_path):
    shots = tmp_path / "s.yaml"
    shots.write_text("version: 1\nshots:\n"
                     "  - {id: a, prompt: x, duration: 2, guidance: 1e38}\n"
                     "  - {id: b, prompt: x, duration: 2, shift: 1000}\n"
                     "  - {id: c, prompt: x, duration: 2, steps: 1000000000000000000000000}\n"
                     "  - {id: \"d\\n\", prompt: x, duration: 2}\n")
    proc = run_cli("render", str(shots), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for expected in ("s.yaml:3: shots[0].guidance: expected a number <= 100, found 1e+38",
                     "s.yaml:4: shots[1].shift: expected a number <= 100, found 1000",
                     "s.yaml:5: shots[2].steps: expected a number of at most 15 digits, found a larger one",
                     "s.yaml:6: shots[3].id:"):
        assert expected in proc.stderr, proc.stderr
    assert "found 'd\\n'" in proc.stderr  # the newline shown as an escape, on one line
    assert not (tmp_path / "out").exists()
