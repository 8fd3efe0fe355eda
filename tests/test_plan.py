"""Frame accounting and the task graph, for both seeding modes (pure; no model)."""

from __future__ import annotations

import json

import pytest

from conftest import run_measured
from mmpl_cli.errors import InputError
from mmpl_cli.plan import derive_seed, frame_accounting, plan_shot, task_hashes
from mmpl_cli.profiles import load_profile
from mmpl_cli.shotlist import PromptChange, Shot

PROFILE = load_profile("tiny")


def shot(duration: float, strategy: str = "mmpl", prompts=(PromptChange(0.0, "x"),), seed: int = 0) -> Shot:
    return Shot(id="s", prompts=tuple(prompts), duration=duration, seed=seed, negative_prompt="", init_image=None,
                strategy=strategy, sampler_overrides={}, line=1)


@pytest.mark.parametrize("seeding, window", [("terminal", 81), ("midpoint", 49)])
@pytest.mark.parametrize("duration", [0.05, 1, 3, 5, 81 / 16, 82 / 16, 10, 14, 60, 61.3])
def test_frame_accounting(seeding, window, duration):
    plan = plan_shot(shot(duration), PROFILE, seeding)
    frames = max(1, round(duration * 16))
    assert plan.frames == frames
    segs = plan.segments
    # the video is exactly the kept frames, back to back: nothing lost, nothing shown twice
    assert sum(s.kept for s in segs) == frames
    assert [s.video_from for s in segs] == [sum(x.kept for x in segs[:i]) for i in range(len(segs))]
    assert segs[0].keep_from == 0
    for s in segs[1:]:
        # a later segment's initial latents (5 pixel frames) re-encode frames already shown: dropped
        assert s.keep_from == PROFILE.pixel_frames(len(PROFILE.layout.initial)) == 5
    for s in segs[:-1]:
        assert s.keep_to == window
    assert segs[-1].keep_to <= window
    # the fewest segments that can hold the shot
    assert len(segs) == 1 + max(0, -(-(frames - window) // (window - 5)))


def test_paper_sixty_seconds_is_twelve_segments_with_terminal_seeding():
    # 60 s at 16 fps = 960 frames = 81 + 76 * 11.56.. -> 13 windows; the paper counts 12 five-second
    # segments because its 81-frame windows overlap; we keep every frame exactly once.
    plan = plan_shot(shot(60), PROFILE, "terminal")
    assert plan.frames == 960
    assert len(plan.segments) == 13


def test_task_graph_terminal_and_midpoint():
    term = plan_shot(shot(9), PROFILE, "terminal")  # 144 frames: 81 + 63
    kinds = [t.kind for t in term.tasks]
    assert kinds.count("populate_stage_two") == len(term.segments) == 2
    assert term.task("s/s001/initial").deps == ("s/s000/initial", "s/s000/plan")  # the macro chain
    assert term.task("s/s000/populate_stage_two").deps == ("s/s000/initial", "s/s000/plan", "s/s000/populate_stage_one")
    mid = plan_shot(shot(9), PROFILE, "midpoint")
    assert "populate_stage_two" not in [t.kind for t in mid.tasks]
    # tasks are listed in an order that respects their dependencies
    for p in (term, mid):
        seen = set()
        for t in p.tasks:
            assert set(t.deps) <= seen
            seen.add(t.id)


def test_seeds_depend_on_shot_seed_and_segment_only():
    a = plan_shot(shot(10, seed=1), PROFILE, "terminal")
    b = plan_shot(shot(10, seed=1), PROFILE, "midpoint")
    c = plan_shot(shot(10, seed=2), PROFILE, "terminal")
    assert a.segments[0].noise_seed == b.segments[0].noise_seed == derive_seed(1, "segment-0")
    assert a.segments[0].noise_seed != a.segments[1].noise_seed
    assert a.segments[0].noise_seed != c.segments[0].noise_seed


def test_prompt_schedule_per_segment():
    p = plan_shot(shot(14, prompts=(PromptChange(0, "a"), PromptChange(5, "b"), PromptChange(9.5, "c"))),
                  PROFILE, "terminal")
    # segments start at frames 0, 81, 157 = 0 s, 5.06 s, 9.81 s
    assert [s.prompt for s in p.segments] == ["a", "b", "c"]


def test_full_strategy_is_one_window():
    assert len(plan_shot(shot(5, "full"), PROFILE, "terminal").segments) == 1
    with pytest.raises(InputError, match="one window of 81 frames"):
        plan_shot(shot(6, "full"), PROFILE, "terminal")


def test_sliding_window_chains_whole_windows_over_their_last_five_latents():
    p = plan_shot(shot(14, "sliding-window"), PROFILE, "midpoint")  # seeding does not apply: whole windows
    assert p.seeding == "terminal"
    # each later window reuses 5 latents = 17 frames of the previous one and adds 64
    assert [(s.keep_from, s.keep_to, s.video_from) for s in p.segments] == [
        (0, 81, 0), (17, 81, 81), (17, 81, 145), (17, 32, 209)]  # 81 + 64 + 64 + 15 = 224 frames
    windows = [t for t in p.tasks if t.kind == "window"]
    assert [t.deps for t in windows] == [(), (windows[0].id,), (windows[1].id,), (windows[2].id,)]
    assert p.summary()["segment_plan"][1]["plan_content_boundaries"] == []
    # the context size is part of every window's hash, and a window's hash follows its predecessor's
    hashes = task_hashes(p, "model")
    edited = task_hashes(plan_shot(shot(14, "sliding-window", seed=8), PROFILE, "terminal"), "model")
    assert all(hashes[t.id] != edited[t.id] for t in windows)


def test_progressive_is_a_chain_cut_like_sliding_window_with_a_level_per_step():
    from mmpl_cli.plan import progressive_levels

    p = plan_shot(shot(14, "progressive"), PROFILE, "midpoint")
    assert p.seeding == "terminal"
    sliding = plan_shot(shot(14, "sliding-window"), PROFILE, "terminal")
    assert p.segments == sliding.segments
    chain = [t for t in p.tasks if t.kind == "progressive"]
    assert [t.deps for t in chain] == [(), (chain[0].id,), (chain[1].id,), (chain[2].id,)]
    # one noise level per sampling step, as many as fit behind the clean chunk in a 21-latent window
    assert progressive_levels(21, 8) == 8 and progressive_levels(21, 50) == 9 and progressive_levels(21, 3) == 3


def test_mmpl_plan_lists_its_planning_to_content_edges():
    p = plan_shot(shot(5), PROFILE, "terminal")
    # latents 3|4, 9|10, 12|13, 18|19 (2, 3, 10, 11, 12, 19, 20 plan; 0, 1 initial): frames 13, 37, 49, 73
    assert p.summary()["segment_plan"][0]["plan_content_boundaries"] == [13, 37, 49, 73]


def test_frame_accounting_rejects_windows_without_new_frames():
    with pytest.raises(ValueError):
        frame_accounting(100, 5, 5)


def test_strategy_option_overrides_every_shot():
    from conftest import run_cli

    proc = run_cli("plan", "examples/shots.yaml", "--strategy", "sliding-window", "--json")
    assert proc.returncode == 0, proc.stderr
    shots = json.loads(proc.stdout)["shots"]
    assert {s["strategy"] for s in shots} == {"sliding-window"}
    assert all(t["kind"] in ("window", "decode", "stitch") for s in shots for t in s["tasks"])
    bad = run_cli("plan", "examples/shots.yaml", "--strategy", "sliding")
    assert bad.returncode == 2 and "sliding" in bad.stderr


@pytest.mark.slow
def test_planning_a_day_long_shot_stays_under_500_mb(tmp_path):
    """18190 segments, 90951 tasks: plan, schedule and JSON report in one process (docs/limits.md)."""
    shots = tmp_path / "day.yaml"
    shots.write_text("version: 1\nshots:\n  - {id: day, prompt: a whole day, duration: 86400}\n")
    proc, peak_mb = run_measured("plan", str(shots), "--json", "--gpus", "4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shots"][0]["segments"] == 18190
    assert peak_mb < 500, peak_mb


def test_task_hashes_are_those_of_earlier_versions():
    """A finished task is found again by its hash, so a hash may change only with what the task computes:
    these are the hashes mmpl 0.1 gave, over every kind of task and every field that goes in one (a
    digest of them all, so that a faster way of computing them cannot change one by accident)."""
    import dataclasses
    import hashlib

    self_forcing = load_profile("self-forcing-dmd-1.3b")
    profiles = [PROFILE, dataclasses.replace(PROFILE, handover="reencode"), dataclasses.replace(PROFILE, handover="direct"),
                dataclasses.replace(PROFILE, decode="alone", noise_blend=None), self_forcing, load_profile("wan2.1-t2v-14b")]
    prompts = (PromptChange(0.0, 'a "quoted" fox, ü ✓'), PromptChange(6.0, "then rain\nat night"))
    samplers = [{}, {"search": 3, "search_steps": 1}, {"steps": 8, "guidance": 1.0, "shift": 3.0, "scheduler": "euler"}]
    lines = []
    for p, profile in enumerate(profiles):
        for strategy in ("mmpl", "full", "sliding-window", "progressive", "causal"):
            for s, sampler in enumerate(samplers):
                if sampler.get("search", 1) > 1 and strategy not in ("mmpl",):
                    continue
                if profile is self_forcing and (strategy == "progressive" or sampler):
                    continue
                for seeding in ("terminal", "midpoint"):
                    duration = 4 if strategy == "full" else 14  # full: one window
                    one = dataclasses.replace(shot(duration, strategy, prompts, seed=p + s), negative_prompt="blurry, ∅",
                                              sampler_overrides=sampler)
                    plan = plan_shot(one, profile, seeding)
                    for image in (None, "ab" * 32) if strategy == "mmpl" else (None,):
                        hashes = task_hashes(plan, f"model-{p}", image)
                        lines += [f"{p} {strategy} {s} {seeding} {image} {task} {h}" for task, h in hashes.items()]
    assert len(lines) > 1000
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert digest == "29b3cef9b7c1a5da5297c6fbabcaa07dab0a8263f65958af83f9fc270d550f25"
