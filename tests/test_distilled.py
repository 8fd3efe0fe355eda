"""Few-step distilled checkpoints: the few-step sampling loop against its equations, the `causal`
strategy (Self-Forcing's rollout) against the masked recomputation, renders that resume
bit-identically, the Self-Forcing profile, and what `mmpl plan` says of a few-step shot."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli, videos
from test_resume import wait_for_start
from test_weights import original_name, transformer_state

FEW_STEP = "scheduler: few-step, timesteps: [1000, 750, 500, 250], guidance: 1"


def few_step_sampler():
    from mmpl_cli.profiles import Sampler

    return Sampler(scheduler="few-step", steps=4, shift=5.0, guidance=1.0, timesteps=(1000, 750, 500, 250))


def test_the_few_step_loop_is_its_equations(backend):
    """Written out here from the equations: at each level sigma_i the clean estimate x0 = x - sigma_i
    * flow(x, 1000 sigma_i), then x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_i with fresh noise; the
    last step returns x0. Levels: Self-Forcing's timesteps warped by the shift, t -> 5u / (1 + 4u)."""
    from mmpl_cli.sampling import make_scheduler, noise_seed

    sampler = few_step_sampler()
    torch.manual_seed(0)
    noise = torch.randn(16, 3, 8, 12)
    text = backend.text("a small red circle moving right on a blue background", "", 1.0)
    frames = (0, 1, 2)
    made = backend.denoise(noise, frames, (), [], text, sampler)
    assert torch.equal(made, backend.denoise(noise, frames, (), [], text, sampler))  # deterministic

    levels = [1.0, 3.75 / 4, 2.5 / 3, 1.25 / 2]
    torch.testing.assert_close(make_scheduler(sampler).timesteps, torch.tensor(levels) * 1000)
    fresh = torch.Generator().manual_seed(noise_seed(noise))  # the same fresh noise, in the same order
    x = noise.clone()
    for i, sigma in enumerate(levels):
        with torch.no_grad():
            flow = backend.forward_at(x, frames, torch.tensor(sigma * 1000), text.cond)
        x0 = x - sigma * flow
        if i + 1 < len(levels):
            x = (1 - levels[i + 1]) * x0 + levels[i + 1] * torch.randn(x.shape, generator=fresh)
        else:
            x = x0
    torch.testing.assert_close(made, x, atol=1e-5, rtol=0)
    # another group's noise draws other fresh noise
    assert noise_seed(noise) != noise_seed(noise[:, :2])


def test_the_causal_rollout_through_its_cache_is_the_masked_recomputation(backend):
    """Each block sees the clean context and every block before it: through the cache (each finished
    block run once at t = 0) and recomputed in one masked pass per evaluation, for the few-step
    sampler and for a guided multi-step one (two caches, one per text)."""
    from mmpl_cli.profiles import Sampler
    from mmpl_cli.wan import ContextGroup

    torch.manual_seed(1)
    context = [ContextGroup(torch.randn(16, 2, 8, 12), (0, 1), ())]
    noise = torch.randn(16, 7, 8, 12)
    blocks = [(2, 3, 4), (5, 6, 7), (8,)]
    for sampler, guidance in ((few_step_sampler(), 1.0), (Sampler(steps=3, guidance=5.0), 5.0)):
        text = backend.text("a small blue square moving left on a yellow background", "grey", guidance)
        for ctx in (context, []):
            cached = backend.rollout(noise, blocks, ctx, text, sampler)
            reference = backend.rollout(noise, blocks, ctx, text, sampler, recompute_context=True)
            torch.testing.assert_close(cached, reference, atol=2e-4, rtol=0)


def test_distilled_samplers_with_guidance_are_refused(tmp_path):
    from mmpl_cli.errors import InputError
    from mmpl_cli.plan import plan_shot_list
    from mmpl_cli.profiles import load_profile
    from mmpl_cli.shotlist import load_shot_list

    text = (REPO / "profiles" / "self-forcing-dmd-1.3b.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("guidance: 1.0 ", "guidance: 5.0 "))
    with pytest.raises(InputError, match=r"sampler.guidance: expected 1 with the few-step sampler .* found 5"):
        load_profile(str(bad))
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\nshots:\n  - {id: a, prompt: a boat, duration: 2, guidance: 3}\n"
                     "  - {id: b, prompt: a boat, duration: 2, strategy: progressive}\n"
                     "  - {id: c, prompt: a boat, duration: 2, scheduler: unipc, steps: 30, guidance: 5}\n")
    with pytest.raises(InputError) as caught:
        plan_shot_list(load_shot_list(shots), load_profile("self-forcing-dmd-1.3b"), "terminal")
    message = str(caught.value)
    assert "a.guidance: expected 1 with the few-step sampler" in message
    assert "b.scheduler: expected unipc or euler with strategy 'progressive'" in message
    assert "c." not in message  # a multi-step sampler over the few-step profile: allowed, guided
    proc = run_cli("render", str(shots), "--profile", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "sampler.guidance" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_causal_render_resumes_bit_identically(tiny_model_dir, tmp_path):
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\ndefaults: {seed: 5, scheduler: few-step, timesteps: [1000, 500], guidance: 1}\n"
                     "shots:\n  - {id: c, prompt: a small red circle moving right on a blue background, duration: 6, "
                     "strategy: causal}\n")
    args = ["render", str(shots), "--model-path", str(tiny_model_dir)]
    reference = tmp_path / "reference"
    proc = run_cli(*args, "--out", str(reference))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, "-m", "mmpl_cli", *args, "--out", str(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_start(out, "c/s001/causal", killed)  # the second segment, from the first one's last latents
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    proc = run_cli(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "c.mp4" in videos(out) and videos(out) == videos(reference)


@pytest.mark.slow
def test_the_self_forcing_profile_loads_a_self_forcing_checkpoint(tiny_model_dir, tmp_path):
    """A `.pt` laid out as Self-Forcing saves it ({"generator", "generator_ema"}, original Wan names
    under `model.`): the profile takes generator_ema, and says so."""
    state = transformer_state(tiny_model_dir)
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": {f"model.{original_name(k)}": v * 0.5 for k, v in state.items()},
                "generator_ema": {f"model.{original_name(k)}": v for k, v in state.items()}}, ckpt)
    text = (REPO / "profiles" / "self-forcing-dmd-1.3b.yaml").read_text()
    tiny = (REPO / "profiles" / "tiny.yaml").read_text()
    # the Self-Forcing profile's sampler, strategy and checkpoint entry over the tiny model's size and layout
    head, layout = text.split("text:\n")[0], tiny[tiny.index("text:\n"):]
    head = head.replace("width: 832", "width: 96").replace("height: 480", "height: 64")
    profile = tmp_path / "sf.yaml"
    profile.write_text(head.replace("dtype: bfloat16", "dtype: float32").replace("architecture: wan2.1-1.3b", "") + layout)
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\nshots:\n  - {id: a, prompt: a small red circle moving right on a blue background, "
                     "duration: 1}\n"  # the profile's strategy, causal
                     "  - {id: m, prompt: a small green square moving left on a white background, duration: 1, "
                     "strategy: mmpl}\n")  # MMPL's groups with the few-step sampler, for MMPL-distilled checkpoints
    env = {"MMPL_WAN21_T2V_1_3B": str(tiny_model_dir), "MMPL_SELF_FORCING_DMD": str(ckpt)}
    proc = run_cli("render", str(shots), "--profile", str(profile), "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "transformer from self_forcing_dmd.pt: entry 'generator_ema'" in proc.stdout
    assert {"a.mp4", "m.mp4"} <= set(videos(tmp_path / "out"))
    plan = run_cli("plan", str(shots), "--profile", str(profile), env=env)
    assert "a: 16 frames = 1.000 s, 1 segment(s), 3 tasks, strategy causal, 4 few-step steps" in plan.stdout
    assert "m: 16 frames = 1.000 s, 1 segment(s), 6 tasks, strategy mmpl, 4 few-step steps" in plan.stdout


def test_plan_states_a_few_step_minute_beside_the_fifty_step_one(tmp_path):
    shots = tmp_path / "shots.yaml"
    shots.write_text(f"version: 1\ndefaults: {{{FEW_STEP}}}\nshots:\n"
                     "  - {id: minute, prompt: a paper boat drifts down a gutter, duration: 60}\n")
    proc = run_cli("plan", str(shots), "--profile", "wan2.1-t2v-1.3b", "--gpus", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    few = float(lines[-2].split("makespan ")[1].split(" s")[0])
    fifty = float(lines[-1].split("makespan ")[1].split(" s")[0])
    assert "wan2.1-t2v-1.3b's own sampler (50 unipc steps, guidance 5)" in lines[-1]
    assert 3 < fifty / few < 25  # 4 evaluations a step group against 100; the VAE's hand-overs do not shrink
