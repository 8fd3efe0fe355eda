"""The words every module shares, in one place: task and group kinds, seeding modes, strategies and
dtypes. They are `StrEnum`s, so each member is the very string that task ids, hashes, manifests,
profiles and shot lists have always held ("plan" == Kind.PLAN): files written before they existed
still read the same."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """What a task makes. MMPL's four groups of a segment (MMPL paper, Sec. 3), the baselines'
    whole-window tasks, and the two video tasks."""

    INITIAL = "initial"  # the first latents: from text, an image, or the previous segment's hand-over
    PLAN = "plan"  # the micro plan: early, mid-point and terminal planning latents, jointly
    POPULATE_ONE = "populate_stage_one"  # content between the initial group and the mid-point plan
    POPULATE_TWO = "populate_stage_two"  # content after the mid-point plan (terminal seeding only)
    FULL = "full"  # stock Wan: one window from text
    WINDOW = "window"  # sliding-window: a window conditioned on the previous one's last latents
    PROGRESSIVE = "progressive"  # PA-VDM: a segment's rounds of progressive denoising
    CAUSAL = "causal"  # Self-Forcing: a segment's blocks, each after the clean ones before it, through a cache
    DECODE = "decode"  # a segment's latents -> its MP4
    STITCH = "stitch"  # the segments' MP4s -> the shot's MP4


GROUPS = (Kind.INITIAL, Kind.PLAN, Kind.POPULATE_ONE, Kind.POPULATE_TWO)  # MMPL's, in order of making
LATENT_KINDS = (*GROUPS, Kind.FULL, Kind.WINDOW, Kind.PROGRESSIVE, Kind.CAUSAL)  # tasks whose result is latents


class Seeding(StrEnum):
    """Which planning latents seed the next segment (MMPL paper, Sec. 3.3)."""

    TERMINAL = "terminal"  # the terminal plan: whole windows, more throughput
    MIDPOINT = "midpoint"  # the mid-point plan: half windows, lower memory peak


SEEDINGS = tuple(s.value for s in Seeding)


class Strategy(StrEnum):
    """How a shot is rendered: MMPL, or one of the baselines it is compared with."""

    MMPL = "mmpl"
    FULL = "full"
    SLIDING_WINDOW = "sliding-window"
    PROGRESSIVE = "progressive"
    CAUSAL = "causal"


STRATEGIES = tuple(s.value for s in Strategy)
# the task that makes all of a segment's latents
WINDOW_KIND = {Strategy.FULL: Kind.FULL, Strategy.SLIDING_WINDOW: Kind.WINDOW,
               Strategy.PROGRESSIVE: Kind.PROGRESSIVE, Strategy.CAUSAL: Kind.CAUSAL}

CAUSAL_BLOCK = 3  # latents per block of Self-Forcing's causal rollout, as its checkpoints were trained

DTYPES = ("float32", "bfloat16", "float16")  # a profile's model.dtype
