"""The strategies MMPL is compared with, as tasks of the same runner (render.ShotRunner): stock Wan
(`full`: one window from text), the sliding window (`window`: each window conditioned on the last
latents of the one before, as they are), progressive autoregressive denoising (`progressive`,
PA-VDM) and Self-Forcing's causal rollout (`causal`). Each takes the runner, the task and the
results of the tasks it depends on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmpl_cli.plan import (CAUSAL_CONTEXT, PROGRESSIVE_CHUNK, SLIDING_CONTEXT, Task, derive_seed, progressive_levels,
                           segment_task_id)
from mmpl_cli.sampling import euler_levels, flow_sigma, segment_noise
from mmpl_cli.results import Latents
from mmpl_cli.terms import CAUSAL_BLOCK, Kind
from mmpl_cli.wan import ContextGroup

if TYPE_CHECKING:
    from mmpl_cli.render import Results, ShotRunner


def full(runner: ShotRunner, task: Task, results: Results) -> Latents:
    """Stock Wan: every latent of one window jointly from text (the reference strategy)."""
    frames = tuple(range(runner.layout.latents))
    latents = runner.backend.denoise(runner.noise(task.segment), frames, (), [], runner.text(task.segment),
                                     runner.plan.sampler, callback=runner.step)
    return Latents(latents)


def sliding_window(runner: ShotRunner, task: Task, results: Results) -> Latents:
    """Sliding window: the first window from text, every later one conditioned on the previous
    window's last latents as they are (the baseline MMPL's re-encode hand-over improves on)."""
    k, n, c = task.segment, runner.layout.latents, SLIDING_CONTEXT
    if k == 0:
        return full(runner, task, results)
    previous = runner.latents(results, k - 1, Kind.WINDOW)[:, -c:]
    context = [ContextGroup(previous, tuple(range(c)), ())]
    new = runner.denoise(k, lambda candidate: runner.noise(k, candidate)[:, c:], tuple(range(c, n)), tuple(range(c)),
                         context)
    return Latents(torch.cat([previous, new], dim=1))


def causal(runner: ShotRunner, task: Task, results: Results) -> Latents:
    """Self-Forcing's chunk-wise autoregressive rollout (Self-Forcing, Sec. 3; its inference loop): the
    window's latents in blocks of CAUSAL_BLOCK, each denoised with the profile's sampler (a distilled
    checkpoint's few-step loop) against the clean blocks before it, read from a key/value cache into
    which every finished block is run once at t = 0. A later segment starts from the previous one's
    last CAUSAL_CONTEXT latents as clean context (the first blocks of its window), as they are."""
    k, n = task.segment, runner.layout.latents
    c = CAUSAL_CONTEXT if k else 0
    context = []
    if k:
        previous = runner.latents(results, k - 1, Kind.CAUSAL)[:, -c:]
        context = [ContextGroup(previous, tuple(range(c)), ())]
    blocks = [tuple(range(s, min(s + CAUSAL_BLOCK, n))) for s in range(c, n, CAUSAL_BLOCK)]
    made = runner.backend.rollout(runner.noise(k)[:, c:], blocks, context, runner.text(k), runner.plan.sampler,
                                  callback=runner.step)
    return Latents(torch.cat([previous, made], dim=1) if k else made)


def progressive(runner: ShotRunner, task: Task, results: Results) -> Latents:
    """Progressive autoregressive denoising (PA-VDM, Alg. 1 with its start-up stage).

    The shot is one stream of latents in chunks of PROGRESSIVE_CHUNK. Chunk j joins the window as
    pure noise in round j; every round runs the model once over the window, each chunk at its own
    noise level, and moves every chunk one level down (flow-matching Euler). After `levels` rounds
    chunk j is clean: it leaves the noisy part and stays one round in front as clean context (the
    paper's "keep a clean chunk"). A segment is the stream's latents [16k, 16k + 21), as
    sliding-window cuts it; task k runs the rounds that make those clean and hands on the window
    (the clean chunk and the noisy chunks behind it) to task k + 1. There is no termination stage:
    the noisy chunks left after the last segment are dropped (the paper's base design).
    """
    plan, shape = runner.plan, runner.latent_shape
    k, n, c = task.segment, runner.layout.latents, PROGRESSIVE_CHUNK
    levels, stride = progressive_levels(n, plan.sampler.steps), n - SLIDING_CONTEXT

    def last_chunk(segment: int) -> int:  # the chunk holding the segment's last latent
        return (stride * segment + n - 1) // c

    stream: dict[int, torch.Tensor] = {}  # latent index in the shot -> latent [C, H, W]
    window: dict[int, torch.Tensor] = {}  # chunk -> its latents [C, c, H, W], oldest first
    first_round = 0
    if k > 0:
        previous = results[segment_task_id(plan.shot.id, k - 1, Kind.PROGRESSIVE)]
        for i in range(n):
            stream[stride * (k - 1) + i] = previous.latents[:, i]
        first_round = last_chunk(k - 1) + levels  # the round after the one that made chunk last_chunk(k - 1) clean
        for pos, chunk in enumerate(range(first_round - levels, first_round)):
            window[chunk] = previous.window[:, pos * c:(pos + 1) * c]
        for i in range(c):  # the clean chunk in front may hold this segment's first new latent
            stream[(first_round - levels) * c + i] = window[first_round - levels][:, i]
    rounds = range(first_round, last_chunk(k) + levels)
    text, shift = runner.text(k), plan.sampler.shift
    seed = plan.segments[k].noise_seed

    def sigma(level: int) -> float:
        return flow_sigma(level / levels, shift)

    for done, r in enumerate(rounds, 1):
        window[r] = segment_noise(derive_seed(seed, f"chunk-{r}"), (shape[0], c, *shape[2:]))
        window.pop(r - levels - 1, None)  # clean for a round now: out of the window
        chunks = sorted(window)
        x = torch.cat([window[j] for j in chunks], dim=1)
        before = torch.tensor([sigma(max(0, levels - (r - j))) for j in chunks for _ in range(c)])
        after = torch.tensor([sigma(max(0, levels - (r - j) - 1)) for j in chunks for _ in range(c)])
        x = euler_levels(x, runner.backend.flow_at_levels(x, before * 1000.0, text, plan.sampler.guidance),
                         before, after)
        for pos, j in enumerate(chunks):
            window[j] = x[:, pos * c:(pos + 1) * c]
        clean = r - levels + 1
        if clean >= 0:
            for i in range(c):
                stream[clean * c + i] = window[clean][:, i]
        runner.step(done, len(rounds))
    latents = torch.stack([stream[stride * k + i] for i in range(n)], dim=1)
    handed = torch.cat([window[j] for j in range(rounds[-1] - levels + 1, rounds[-1] + 1)], dim=1)
    return Latents(latents, window=handed)
