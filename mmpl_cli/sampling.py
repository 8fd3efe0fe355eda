"""Sampling math: schedulers, classifier-free guidance, the denoising loop and noise initialization.

Pure functions of tensors (k-diffusion style): no files, no ranks, no model loading. The solvers
themselves are diffusers' (UniPC and flow-match Euler); this module only wires them up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from mmpl_cli.profiles import Sampler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> flow prediction
StepCallback = Callable[[int, int], None]  # (step done, steps in all)


def make_scheduler(sampler: Sampler, num_train_timesteps: int = 1000, seed: int = 0):
    """A fresh scheduler for one group: diffusers' as Wan2.1 ships it (flow matching, shift), or the
    few-step sampler of distilled models (its fresh noise drawn from `seed`)."""
    if sampler.scheduler == "few-step":
        return FewStepScheduler(sampler.timesteps, sampler.shift, seed, num_train_timesteps)
    if sampler.scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=sampler.shift,
        )
    elif sampler.scheduler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=sampler.shift)
    else:
        raise ValueError(f"unknown scheduler {sampler.scheduler!r}")
    scheduler.set_timesteps(sampler.steps)
    return scheduler


class FewStepScheduler:
    """The sampling loop of few-step distilled models (consistency models; DMD, as Self-Forcing runs it):
    at each timestep the model's clean estimate x0 = x - sigma * flow, then fresh noise at the next
    level, x = (1 - sigma') x0 + sigma' eps; the last step returns x0. The timesteps are the ones the
    checkpoint was trained at, "warped" as Self-Forcing warps them: timestep t runs at the shifted
    level flow_sigma(t / 1000, shift) (1000, 750, 500, 250 at shift 5: 1000, 937.5, 833.3, 625).
    Each eps is drawn on the CPU from `seed`, so a group's draws are a function of its task alone.
    Duck-types the part of a diffusers scheduler that `sample` uses (timesteps, sigmas, step)."""

    def __init__(self, timesteps, shift: float, seed: int, num_train_timesteps: int = 1000):
        levels = [flow_sigma(t / num_train_timesteps, shift) for t in timesteps]
        self.sigmas = torch.tensor([*levels, 0.0], dtype=torch.float32)  # level after each step; the last: clean
        self.timesteps = self.sigmas[:-1] * num_train_timesteps
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.index = 0

    def step(self, flow: torch.Tensor, t, x: torch.Tensor, return_dict: bool = False):
        sigma, after = float(self.sigmas[self.index]), float(self.sigmas[self.index + 1])
        self.index += 1
        clean = x - sigma * flow
        if after == 0.0:
            return (clean,)
        eps = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device)
        return ((1.0 - after) * clean + after * eps,)


def noise_seed(noise: torch.Tensor) -> int:
    """A seed that is a function of a group's starting noise (itself of the task's seed): the few-step
    sampler's fresh noise then differs from group to group and candidate to candidate, and never
    depends on where or when the task runs."""
    import hashlib

    digest = hashlib.sha256(noise.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def flow_sigma(u: float, shift: float) -> float:
    """Wan's shifted flow-matching noise level for u in [0, 1] (shift > 1 favours noisy levels), the
    same map diffusers' flow schedulers apply to their sigmas."""
    return shift * u / (1 + (shift - 1) * u)


def euler_levels(x: torch.Tensor, flow: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step with a noise level per frame: x [C, F, H, W] at `before` [F] to
    `after` [F] (diffusers' schedulers step a whole tensor at one level, so progressive denoising does
    this one line itself)."""
    return x + (after - before).to(x)[None, :, None, None] * flow


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    if uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


def sample(model_fn: ModelFn, x: torch.Tensor, scheduler, callback: StepCallback | None = None,
           stop_after: int | None = None) -> torch.Tensor:
    """Run `scheduler`'s timesteps from noise `x` (only the first `stop_after` of them, if given);
    `model_fn` already applies guidance."""
    timesteps = scheduler.timesteps if stop_after is None else scheduler.timesteps[:stop_after]
    for i, t in enumerate(timesteps):
        flow = model_fn(x, t)
        x = scheduler.step(flow, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, len(timesteps))
    return x


def blend_edge_noise(noise: torch.Tensor, targets: Sequence[int], anchors: set[int], alpha: float,
                     anchor_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Noise initialization at planning-to-content boundaries (MMPL paper, App. G, Eq. 14).

    `noise` holds one noise latent per latent index of the segment, [C, F, H, W]. For each edge of
    a contiguous run of `targets` whose two neighbours outside the run are planning latents
    (`anchors`), the edge latent starts from alpha * eps(adjacent) + (1 - alpha) * eps(next one
    over) instead of fresh noise. The blend is rescaled to unit variance so that the sampler
    still starts from N(0, I); the paper does not say how it handles this, and without it the
    edge latent would start with too little noise. eps(anchor) is read from `anchor_noise` when
    given (the noise the anchors really started from), else from `noise`. Returns the target
    noise, [C, len(targets), H, W].
    """
    source = noise if anchor_noise is None else anchor_noise
    out = noise[:, list(targets)].clone()
    scale = (alpha**2 + (1 - alpha) ** 2) ** 0.5
    order = {index: pos for pos, index in enumerate(targets)}
    for pos, index in enumerate(targets):
        for step in (-1, 1):
            if index + step in order:
                continue  # not an edge on this side
            near, far = index + step, index + 2 * step
            if near in anchors and far in anchors:
                out[:, pos] = (alpha * source[:, near] + (1 - alpha) * source[:, far]) / scale
                break
    return out


def search_score(x: torch.Tensor, sigma: float, context: torch.Tensor) -> float:
    """How far a partly denoised group's colour is from its clean context's (k-step noise search).

    A latent's per-channel mean over its frames and pixels is its average colour in the VAE's
    space. After a few steps, x = (1 - sigma) * x0 + sigma * noise, and the noise averages out over
    so many values, so mean(x) / (1 - sigma) estimates the mean of the group's final latents. The
    score is the L2 distance of that estimate to the context's mean: smaller is better."""
    estimate = x.float().mean(dim=(1, 2, 3)) / max(1e-3, 1.0 - sigma)
    return float(torch.linalg.vector_norm(estimate - context.float().mean(dim=(1, 2, 3))))


def segment_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """One segment's noise, [C, F, H, W] in float32, drawn on the CPU so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Drawn with a batch axis, as diffusers' pipelines draw it, so the same seed gives the same noise.
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]
