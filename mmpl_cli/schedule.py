"""Adaptive workload scheduling (MMPL paper, Sec. 3.3): task priorities and a simulation of the schedule.

Pure: plans and stage costs in, a schedule out. The same priorities order the real workers:
the planning chain (initial frames, hand-overs, micro plans) first, because it is the critical
path; then the task with the longest remaining path to the end of its shot (so populate stage one
before stage two, and the last segment's populating is not left for the end), earliest segment
first among equals; stitching last.

A rule alone leaves the devices finishing at different times: with the 14B stage costs, 2 GPUs end
up to a populate stage apart. `tuned_priorities` then moves single populating tasks within the
order while the simulated makespan shrinks (a deterministic local search with a fixed budget, so
every worker computes the same order); a batch too large for the budget to try every place of one
task is left in the rule's order. The planning chain always stays first.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.memory import profile_peaks
from mmpl_cli.plan import ShotPlan, Task
from mmpl_cli.profiles import Profile
from mmpl_cli.terms import GROUPS, WINDOW_KIND, Kind, Seeding

CHAIN = (Kind.INITIAL, Kind.PLAN, Kind.WINDOW, Kind.PROGRESSIVE, Kind.CAUSAL)
KIND_ORDER = {Kind.INITIAL: 0, Kind.PLAN: 1, Kind.FULL: 1, Kind.WINDOW: 1, Kind.PROGRESSIVE: 1, Kind.CAUSAL: 1,
              Kind.POPULATE_ONE: 2,
              Kind.POPULATE_TWO: 3, Kind.DECODE: 4, Kind.STITCH: 5}


def evaluations(sampler) -> int:
    """Model evaluations per denoising step run: one per text (two with guidance)."""
    return sampler.steps * (2 if sampler.guidance != 1.0 else 1)


def task_cost(plan: ShotPlan, task: Task) -> float:
    """Seconds for a task on the profile's reference device (profile `costs`, for the profile's own
    sampler): a denoising task's cost scales with the model evaluations of the shot's sampler (a
    4-step distilled sampler without guidance: 4 / 100 of Wan's 50 guided steps)."""
    costs = plan.profile.costs
    scale = evaluations(plan.sampler) / evaluations(plan.profile.sampler)
    if task.kind == Kind.INITIAL:
        first_from_text = task.segment == 0 and plan.shot.init_image is None
        return scale * costs.get(Kind.INITIAL, 0.0) if first_from_text else costs.get("handover", 0.0)
    if task.kind in WINDOW_KIND.values():
        return scale * sum(costs.get(k, 0.0) for k in GROUPS)
    if task.kind == Kind.DECODE and plan.decodes_after_previous(task.segment):  # a longer run: layout.decoded
        layout = plan.profile.layout
        return costs.get(task.kind, 0.0) * layout.decoded(plan.seeding, True) / layout.decoded(plan.seeding)
    return (scale if task.kind in GROUPS else 1.0) * costs.get(task.kind, 0.0)


def priorities(plans: list[ShotPlan]) -> dict[str, tuple]:
    """A sort key per task id; smaller runs first."""
    keys = {}
    for shot_index, plan in enumerate(plans):
        children: dict[str, list[str]] = {t.id: [] for t in plan.tasks}
        for t in plan.tasks:
            for dep in t.deps:
                children[dep].append(t.id)
        remaining: dict[str, float] = {}  # longest path from the start of a task to the end of its shot
        for t in reversed(plan.tasks):
            remaining[t.id] = task_cost(plan, t) + max((remaining[c] for c in children[t.id]), default=0.0)
        for t in plan.tasks:
            segment = t.segment if t.segment is not None else 1 << 30
            if t.kind in CHAIN:
                keys[t.id] = (0, segment, shot_index, KIND_ORDER[t.kind])
            else:
                keys[t.id] = (1, -round(remaining[t.id], 6), segment, shot_index, KIND_ORDER[t.kind])
    return keys


@dataclass
class Slot:
    task: str
    kind: str
    shot: str
    segment: int | None
    device: int
    start: float
    end: float


@dataclass
class Schedule:
    devices: int
    seeding: str
    makespan_s: float
    total_work_s: float
    critical_path_s: float
    peak_memory_gb: float | None
    slots: list[Slot] = field(default_factory=list)
    profile_sampler_makespan_s: float | None = None  # the same shots with the profile's own sampler, where a shot sets another

    @property
    def lower_bound_s(self) -> float:
        return max(self.total_work_s / self.devices, self.critical_path_s)

    def utilisation(self) -> list[float]:
        busy = [0.0] * self.devices
        for s in self.slots:
            busy[s.device] += s.end - s.start
        return [b / self.makespan_s if self.makespan_s else 0.0 for b in busy]

    def summary(self) -> dict:
        return {
            "gpus": self.devices, "seeding": self.seeding,
            "makespan_s": round(self.makespan_s, 3), "lower_bound_s": round(self.lower_bound_s, 3),
            "total_work_s": round(self.total_work_s, 3), "critical_path_s": round(self.critical_path_s, 3),
            "utilisation": [round(u, 4) for u in self.utilisation()],
            "peak_memory_gb": self.peak_memory_gb,
            **({"profile_sampler_makespan_s": round(self.profile_sampler_makespan_s, 3)}
               if self.profile_sampler_makespan_s is not None else {}),
        }


@dataclass
class _Graph:
    """What a simulation needs of the plans, whatever the priorities: computed once per search."""

    tasks: dict[str, tuple[Task, ShotPlan]]
    cost: dict[str, float]
    inputs: dict[str, int]  # inputs per task
    children: dict[str, list[str]]
    total_work_s: float
    critical_path_s: float
    seeding: str


def _graph(plans: list[ShotPlan]) -> _Graph:
    tasks = {task.id: (task, plan) for plan in plans for task in plan.tasks}
    cost = {tid: task_cost(plan, task) for tid, (task, plan) in tasks.items()}
    children: dict[str, list[str]] = {tid: [] for tid in tasks}
    for tid, (task, _) in tasks.items():
        for dep in set(task.deps):
            children[dep].append(tid)
    longest: dict[str, float] = {}  # the longest chain of dependent work ending with each task
    for tid, (task, _) in tasks.items():  # plans list tasks in dependency order
        longest[tid] = cost[tid] + max((longest[d] for d in task.deps), default=0.0)
    return _Graph(tasks, cost, {tid: len(set(task.deps)) for tid, (task, _) in tasks.items()}, children,
                  sum(cost.values()), max(longest.values(), default=0.0),
                  plans[0].seeding if plans else Seeding.TERMINAL)


def _list_schedule(graph: _Graph, devices: int, key: dict[str, tuple], slots: list[Slot] | None = None) -> float:
    """The makespan of list scheduling with these priorities; each placement goes into `slots` if given."""
    waiting = dict(graph.inputs)
    ready = [(key[tid], tid) for tid, n in waiting.items() if not n]
    heapq.heapify(ready)
    free = list(range(devices))
    running: list[tuple[float, int, str]] = []  # (end, device, task)
    now = 0.0
    while ready or running:
        while ready and free:
            _, tid = heapq.heappop(ready)
            device = min(free)
            free.remove(device)
            if slots is not None:
                task, plan = graph.tasks[tid]
                slots.append(Slot(tid, task.kind, plan.shot.id, task.segment, device, now, now + graph.cost[tid]))
            heapq.heappush(running, (now + graph.cost[tid], device, tid))
        now, device, tid = heapq.heappop(running)
        free.append(device)
        finished = [tid]
        while running and running[0][0] == now:  # everything that ends at the same moment
            _, other_device, other = heapq.heappop(running)
            free.append(other_device)
            finished.append(other)
        for done in finished:
            for child in graph.children[done]:
                waiting[child] -= 1
                if not waiting[child]:
                    heapq.heappush(ready, (key[child], child))
    return now


def simulate(plans: list[ShotPlan], devices: int, keys: dict[str, tuple] | None = None,
             peak_memory_gb: float | None = None) -> Schedule:
    """List scheduling: whenever a device is free, it takes the ready task of highest priority
    (`keys`, by default the tuned priorities for this many devices). `peak_memory_gb` is only
    reported (memory.profile_peaks computes it; it reads the model's configs, so not in here)."""
    if devices < 1:
        raise ValueError("need at least one device")
    graph, slots = _graph(plans), []
    makespan = _list_schedule(graph, devices, keys if keys is not None else tuned_priorities(plans, devices), slots)
    return Schedule(devices=devices, seeding=graph.seeding, makespan_s=makespan, total_work_s=graph.total_work_s,
                    critical_path_s=graph.critical_path_s, peak_memory_gb=peak_memory_gb, slots=slots)


def plan_schedule(plans: list[ShotPlan], devices: int, peak_memory_gb: float | None = None) -> Schedule:
    """`mmpl plan`'s schedule: simulate's, and where a shot sets another sampler than its profile's,
    the makespan of the same shots with the profile's own sampler beside it."""
    schedule = simulate(plans, devices, peak_memory_gb=peak_memory_gb)
    if any(evaluations(p.sampler) != evaluations(p.profile.sampler) for p in plans):
        other = simulate([dataclasses.replace(p, sampler=p.profile.sampler) for p in plans], devices)
        schedule = dataclasses.replace(schedule, profile_sampler_makespan_s=other.makespan_s)
    return schedule


def tuned_priorities(plans: list[ShotPlan], devices: int, budget: int = 300_000) -> dict[str, tuple]:
    """The rule's priorities, improved for `devices` devices by moving one non-chain task at a time
    to another place in the order, keeping a move whenever the simulated makespan gets shorter,
    until no single move helps, the makespan is within 0.1% of the lower bound (searching on would
    cost every worker time for nothing) or `budget` task placements are spent (0.3-0.4 s of CPU on
    the 2-core machine). Not searched when the budget cannot try every place of even one task
    (tasks × movable tasks above it: about 700 tasks of 9-s tiny or 60-s 14B shots). Deterministic:
    the same plans and device count give the same order."""
    keys = priorities(plans)
    if devices < 2:
        return keys  # one device never waits: every order takes the same time
    free = sorted((tid for tid, key in keys.items() if key[0] != 0), key=keys.__getitem__)

    def ordered(order: list[str]) -> dict[str, tuple]:
        tuned = dict(keys)
        tuned.update({tid: (1, rank) for rank, tid in enumerate(order)})
        return tuned

    if len(keys) * len(free) > budget:  # cannot try every place of even one task: measured, such a search
        return ordered(free)  # never shortened a batch this large, and cost each worker 0.1-0.44 s (dev/LOG.md)
    graph = _graph(plans)  # the same for every trial: only the order changes
    best = _list_schedule(graph, devices, keys)
    bound = max(graph.total_work_s / devices, graph.critical_path_s) * 1.001 + 1e-6
    cost = len(keys)
    spent, improved = cost, True
    while improved and best > bound and spent < budget:
        improved = False
        for i in range(len(free)):
            for j in range(len(free)):
                if j == i or spent >= budget:
                    continue
                trial = free[:i] + free[i + 1:]
                trial.insert(j, free[i])
                makespan = _list_schedule(graph, devices, ordered(trial))
                spent += cost
                if makespan < best - 1e-6:
                    free, best, improved = trial, makespan, True
                    break
            if improved or spent >= budget:
                break
    return ordered(free)


COLOURS = {Kind.INITIAL: (90, 90, 90), Kind.PLAN: (214, 39, 40), Kind.POPULATE_ONE: (31, 119, 180),
           Kind.POPULATE_TWO: (44, 160, 44), Kind.DECODE: (148, 103, 189), Kind.STITCH: (140, 86, 75),
           **dict.fromkeys(WINDOW_KIND.values(), (255, 127, 14))}


def draw_gantt(schedule: Schedule, path: Path, width: int = 1400) -> Path:
    """Tasks per device over time, coloured by stage and labelled by segment (like MMPL paper, Fig. 6)."""
    from PIL import Image, ImageDraw

    row, top, left, right = 44, 40, 80, 20
    height = top + row * schedule.devices + 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    span = schedule.makespan_s or 1.0
    scale = (width - left - right) / span
    draw.text((left, 10), f"{schedule.devices} device(s), {schedule.seeding} seeding: makespan "
                          f"{schedule.makespan_s:.1f} s, lower bound {schedule.lower_bound_s:.1f} s", fill="black")
    for d in range(schedule.devices):
        y = top + d * row
        draw.text((10, y + row // 2 - 6), f"GPU {d}", fill="black")
    for s in schedule.slots:
        if s.end <= s.start:
            continue
        y = top + s.device * row
        x0, x1 = left + s.start * scale, left + s.end * scale
        draw.rectangle([x0, y + 4, max(x1 - 1, x0 + 1), y + row - 4], fill=COLOURS.get(s.kind, (0, 0, 0)))
        label = f"{s.segment}" if s.segment is not None else "S"
        if x1 - x0 > 12:
            draw.text((x0 + 3, y + row // 2 - 6), label, fill="white")
    axis_y = top + row * schedule.devices + 8
    for i in range(11):
        x = left + (width - left - right) * i / 10
        draw.line([x, axis_y, x, axis_y + 5], fill="black")
        draw.text((x - 10, axis_y + 8), f"{span * i / 10:.0f}s", fill="black")
    legend_x = left
    for kind, colour in COLOURS.items():
        draw.rectangle([legend_x, height - 18, legend_x + 12, height - 6], fill=colour)
        draw.text((legend_x + 16, height - 19), kind, fill="black")
        legend_x += 30 + 7 * len(kind)
    from mmpl_cli.files import atomic_path

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def choose_seeding(profile: Profile, free_gb: list[float] | None, root: Path | None = None) -> tuple[str, str]:
    """Terminal seeding when its peak (the memory model's, memory.py, or the profile's `memory_gb`)
    fits on every GPU, mid-point when only that fits (the MMPL paper, App. E.3); otherwise a clear
    error that says what would fit."""
    if not free_gb:
        return Seeding.TERMINAL, "no GPU: terminal seeding (highest throughput)"
    smallest = min(free_gb)
    peaks = profile_peaks(profile, root, smallest)
    terminal, midpoint = peaks.get(Seeding.TERMINAL), peaks.get(Seeding.MIDPOINT)
    if terminal is None:
        return Seeding.TERMINAL, (f"no memory estimate for {profile.name} (no model folder, no model.architecture): "
                                  "terminal seeding")
    if terminal <= smallest:
        return Seeding.TERMINAL, (f"terminal seeding: needs about {terminal:g} GB, "
                            f"the smallest of {len(free_gb)} GPU(s) has {smallest:.1f} GB free")
    if midpoint is not None and midpoint <= smallest:
        return Seeding.MIDPOINT, (f"mid-point seeding: terminal needs about {terminal:g} GB but the smallest of "
                            f"{len(free_gb)} GPU(s) has {smallest:.1f} GB free; mid-point needs about {midpoint:g} GB")
    raise InputError(Problem(profile.source, None, "memory_gb",
                             f"neither seeding fits: terminal needs about {terminal:g} GB, mid-point about "
                             f"{midpoint if midpoint is not None else '?'} GB, the smallest GPU has {smallest:.1f} GB free",
                             "free GPU memory, use GPUs with more memory, or a smaller profile"))
