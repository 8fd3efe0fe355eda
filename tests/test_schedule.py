"""Adaptive workload scheduling, simulated with the 14B profile's stage costs (MMPL paper, App. E)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import run_cli
from mmpl_cli.errors import InputError
from mmpl_cli.memory import profile_peaks
from mmpl_cli.plan import plan_shot
from mmpl_cli.profiles import load_profile
from mmpl_cli.schedule import choose_seeding, priorities, simulate, tuned_priorities
from mmpl_cli.shotlist import PromptChange, Shot

BIG = load_profile("wan2.1-t2v-14b")
# The paper's "60-second" video counts L = 12 five-second segments; with every frame shown once
# that is 81 + 76 * 11 = 917 frames (57.3 s at 16 fps). A literal 60 s needs 13 segments.
TWELVE_SEGMENTS_S = (81 + 76 * 11) / 16
LATER_DECODE_S = 1.3 * (2 * 21 - 2) / 21  # decode: after-previous runs through the previous window's 21 latents too


def shot(duration: float) -> Shot:
    return Shot("x", (PromptChange(0.0, "x"),), duration, 0, "", None, "mmpl", {}, 1)


def test_paper_work_and_gpu_scaling():
    plan = plan_shot(shot(TWELVE_SEGMENTS_S), BIG, "terminal")
    assert len(plan.segments) == 12
    one, two, four = (simulate([plan], n) for n in (1, 2, 4))
    paper_work = 25 + 12 * (109 + 113 + 148)
    assert paper_work == 4465
    assert abs(one.makespan_s - paper_work) / paper_work <= 0.01  # + hand-overs and decodes (1.3 s each)
    assert two.makespan_s / one.makespan_s <= 2354 / 4465
    assert four.makespan_s / one.makespan_s <= 1660 / 4465
    assert two.makespan_s <= 1.03 * two.lower_bound_s
    assert four.makespan_s <= 1.03 * four.lower_bound_s
    # For the first T_a + T_b = 134 s only the chain can run, so no 2-GPU schedule beats
    # (work + 134) / 2 = 2320.9 s: the tuned order is within 0.2 s of that.
    assert two.makespan_s - (two.total_work_s + 25 + 109) / 2 <= 0.2
    assert one.critical_path_s == pytest.approx(25 + 12 * 109 + 11 * 1.3 + 113 + 148 + LATER_DECODE_S)


@pytest.mark.slow
def test_tuned_order_beats_the_rule_and_is_deterministic():
    """The rule alone leaves 2 GPUs finishing a populate stage apart (2350.8 s); tuning the order
    of populating closes the gap to the bound (work + 134) / 2, the same way every time (every
    worker computes it on its own)."""
    plan = plan_shot(shot(TWELVE_SEGMENTS_S), BIG, "terminal")
    rule = simulate([plan], 2, priorities([plan]))
    tuned = tuned_priorities([plan], 2)
    assert tuned == tuned_priorities([plan], 2)
    bound = (rule.total_work_s + 25 + 109) / 2
    assert rule.makespan_s > bound + 25 and simulate([plan], 2, tuned).makespan_s <= bound + 0.2
    chain = {t for t, k in priorities([plan]).items() if k[0] == 0}
    assert all(tuned[t] == priorities([plan])[t] for t in chain)  # the planning chain stays first
    assert tuned_priorities([plan], 1) == priorities([plan])
    # the literal 60 s (13 segments) too
    plan13 = plan_shot(shot(60.0), BIG, "terminal")
    assert len(plan13.segments) == 13
    two = simulate([plan13], 2)
    assert two.makespan_s <= 1.03 * two.lower_bound_s


def test_a_batch_too_large_for_the_search_budget_is_not_searched(monkeypatch):
    """Where the budget cannot try every place of even one task the search is a lottery (it never
    shortened such a batch: dev/LOG.md), so no worker spends its start on it: the rule's order, no
    simulation at all. A smaller batch is searched."""
    import mmpl_cli.schedule as schedule

    plans = [plan_shot(dataclasses.replace(shot(TWELVE_SEGMENTS_S), id=f"s{i}"), BIG, "terminal") for i in range(20)]
    simulated: list[int] = []
    real = schedule._list_schedule
    monkeypatch.setattr(schedule, "_list_schedule", lambda *a, **k: simulated.append(1) or real(*a, **k))
    keys, tuned = priorities(plans), tuned_priorities(plans, 8)  # 1,220 tasks, 740 of them movable
    assert not simulated and sorted(tuned, key=tuned.__getitem__) == sorted(keys, key=keys.__getitem__)
    tuned_priorities(plans[:3], 8)  # 183 tasks: searched
    assert simulated


def test_plan_json_reports_segments_and_schedule(tmp_path):
    shots = tmp_path / "s.yaml"
    shots.write_text("version: 1\ndefaults: {profile: wan2.1-t2v-14b}\nshots:\n"
                     f"  - {{id: a, prompt: x, duration: {TWELVE_SEGMENTS_S}}}\n")
    gantt = tmp_path / "g.png"
    proc = run_cli("plan", str(shots), "--gpus", "4", "--seeding", "terminal", "--json", "--gantt", str(gantt))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["shots"][0]["segments"] == 12
    assert data["gpus"] == 4 and data["seeding"] == "terminal"
    path = 25 + 12 * 109 + 11 * 1.3 + 113 + 148 + LATER_DECODE_S  # 1610.8 s: four GPUs wait for the chain only
    assert data["makespan_s"] == pytest.approx(path, abs=1e-3) and data["lower_bound_s"] == pytest.approx(path, abs=1e-3)
    assert len(data["utilisation"]) == 4 and data["peak_memory_gb"] == data["memory"]["peak_gb"]["terminal"]
    assert data["peak_memory_gb"] == pytest.approx(68.16, rel=0.15)  # the memory model against the paper's Table 11
    assert gantt.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_midpoint_saves_memory_terminal_saves_time_on_two_gpus():
    """Table 11: a 10-second video (two 81-frame windows, 157 frames) on 2 GPUs."""
    runs = {s: simulate([plan_shot(shot(157 / 16), BIG, s)], 2) for s in ("terminal", "midpoint")}
    peaks = profile_peaks(BIG)  # the memory model, with the text encoder offloaded as on an 80 GB card
    assert peaks["midpoint"] < peaks["terminal"]
    assert runs["terminal"].makespan_s < runs["midpoint"].makespan_s
    assert runs["terminal"].makespan_s == pytest.approx(25 + 2 * 109 + 113 + 148 + 1.3 + LATER_DECODE_S)


def test_priorities_put_the_planning_chain_first():
    plan = plan_shot(shot(TWELVE_SEGMENTS_S), BIG, "terminal")
    slots = simulate([plan], 2).slots
    chain = [s for s in slots if s.kind in ("initial", "plan")]
    assert all(a.end == pytest.approx(b.start) for a, b in zip(chain, chain[1:]))  # never waits


def test_automatic_seeding():
    assert choose_seeding(BIG, None)[0] == "terminal"
    assert choose_seeding(BIG, [80.0, 79.0])[0] == "terminal"
    seeding, why = choose_seeding(BIG, [60.0, 79.0])
    assert seeding == "midpoint" and "60.0 GB free" in why
    with pytest.raises(InputError, match=r"neither seeding fits: terminal needs about 68\.\d+ GB"):
        choose_seeding(BIG, [40.0])
