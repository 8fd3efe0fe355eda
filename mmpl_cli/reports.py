"""What `mmpl status` and `mmpl plan` print: their reports as text lines, `status --json`'s report
and `plan --json`'s summary. The facts come from the store (each task's state, how often it was
computed), plan, schedule and memory."""

from __future__ import annotations


def status_report(store, manifest: dict) -> dict:
    """Per shot, segment and task: done / missing / invalid / stale, how often computed, what remains
    (store.RenderStore.report: the manifest's shape is checked there)."""
    from mmpl_cli.store import DONE

    counts = store.event_log.computed_counts()
    shots, tasks = [], []
    for shot in manifest["shots"]:
        states = []
        for t in shot["tasks"]:
            if t["segment"] is not None and type(t["segment"]) is not int:  # store.report: exit 2, naming the file
                raise ValueError(f"a task's segment is {t['segment']!r}, not a whole number")
            state = store.state(t["id"], t["hash"])
            states.append(state)
            tasks.append({"id": t["id"], "shot": shot["id"], "kind": t["kind"], "segment": t["segment"],
                          "state": state, "computed": counts.get(t["id"], 0)})
        segments: dict[int, dict[str, str]] = {}
        for t, state in zip(shot["tasks"], states):
            if t["segment"] is not None:
                segments.setdefault(t["segment"], {})[t["kind"]] = state
        shots.append({"id": shot["id"], "done": states.count(DONE), "total": len(states),
                      "complete": all(s == DONE for s in states),
                      "video": str(store.shot_video(shot["id"])) if states[-1] == DONE else None,
                      "segments": [{"index": k, "tasks": v} for k, v in sorted(segments.items())]})
    return {"folder": str(store.root), "profile": manifest["profile"]["name"],
            "seeding": manifest["request"]["seeding"], "shots": shots, "tasks": tasks,
            "remaining": sum(1 for t in tasks if t["state"] != DONE), "resume": manifest.get("resume")}


def status_lines(report: dict) -> list[str]:
    lines = [f"{report['folder']}: profile {report['profile']}, {report['seeding']} seeding"]
    for shot in report["shots"]:
        line = f"  {shot['id']}: {shot['done']}/{shot['total']} tasks done"
        lines.append(line + (f", video {shot['video']}" if shot["video"] else ""))
        for seg in shot["segments"]:
            lines.append(f"    s{seg['index']:03d}: " + ", ".join(f"{k} {v}" for k, v in seg["tasks"].items()))
    if report["remaining"]:
        lines.append(f"{report['remaining']} task(s) remain; resume with: {report['resume']}")
    else:
        lines.append("everything is done")
    return lines


def plan_summary(shots, profile, plans, why: str, schedule, memory) -> dict:
    return {
        "shot_list": str(shots), "profile": profile.name, "seeding": plans[0].seeding, "seeding_reason": why,
        "shots": [p.summary() for p in plans], "total_frames": sum(p.frames for p in plans),
        "total_tasks": sum(len(p.tasks) for p in plans), **schedule.summary(), "memory": memory,
    }


def plan_lines(shots, profile, plans, why: str, schedule, gpus: int) -> list[str]:
    lines = [f"{shots}: {len(plans)} shot(s), profile {profile.name} "
             f"({profile.width}x{profile.height}, {profile.fps} fps), {why}"]
    for p in plans:
        lines.append(f"  {p.shot.id}: {p.frames} frames = {p.frames / p.fps:.3f} s, {len(p.segments)} segment(s), "
                     f"{len(p.tasks)} tasks, strategy {p.strategy}, {p.sampler.steps} {p.sampler.scheduler} steps")
        for s in p.segments:
            lines.append(f"    s{s.index:03d}: frames {s.video_from}-{s.video_from + s.kept - 1}  \"{s.prompt}\"")
        last = p.segments[-1]
        if len(p.segments) > 1 and last.kept * 4 < p.profile.segment_frames:
            lines.append(f"    note: the last segment adds only {last.kept} frame(s); a duration of "
                         f"{last.video_from / p.fps:g} s would need one segment fewer")
    util = ", ".join(f"{u:.0%}" for u in schedule.utilisation())
    peak = f", peak memory about {schedule.peak_memory_gb:g} GB per GPU" if schedule.peak_memory_gb else ""
    lines.append(f"simulated on {gpus} GPU(s) with {profile.name}'s stage costs: makespan {schedule.makespan_s:.1f} s "
                 f"(lower bound {schedule.lower_bound_s:.1f} s; work {schedule.total_work_s:.1f} s, critical path "
                 f"{schedule.critical_path_s:.1f} s), utilisation {util}{peak}")
    if schedule.profile_sampler_makespan_s is not None:
        s = profile.sampler
        lines.append(f"  with {profile.name}'s own sampler ({s.steps} {s.scheduler} steps, guidance {s.guidance:g}) "
                     f"instead of the shots': makespan {schedule.profile_sampler_makespan_s:.1f} s")
    return lines
