"""The storyboard: a contact sheet of a shot's macro plan, one row per segment and one tile per
micro-plan latent (MMPL paper, Sec. 3.1), decoded as soon as planning is done, before populating.

Written to <out>/<shot>.storyboard.png by `mmpl render --storyboard` (when the last planning task
of the shot finishes, or on a later run when planning finished earlier or in another worker).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from mmpl_cli.terms import Kind

LABEL = 14  # pixels of text above each row


def contact_sheet(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], gap: int = 4, max_tile_width: int = 240) -> bytes:
    """PNG bytes of rows of labelled tiles: [(row label, [(tile label, uint8 frame [H, W, 3]), ...]), ...]."""
    from PIL import Image, ImageDraw

    height, width = next(t for _, tiles in rows for _, t in tiles).shape[:2]
    scale = min(2.0, max_tile_width / width) if width < max_tile_width else max_tile_width / width
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    columns = max(len(tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (gap + columns * (tw + gap), gap + len(rows) * (th + LABEL + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row_label, tiles) in enumerate(rows):
        y = gap + r * (th + LABEL + gap)
        for c, (tile_label, frame) in enumerate(tiles):
            x = gap + c * (tw + gap)
            draw.text((x, y), f"{row_label} {tile_label}" if c == 0 else tile_label, fill="black")
            sheet.paste(Image.fromarray(frame).resize((tw, th), Image.Resampling.BILINEAR), (x, y + LABEL))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def shot_rows(runner, results, segments: list[int]) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The storyboard rows of a shot: every given segment's planning frames, labelled with the second
    of the shot they fall on."""
    plan = runner.plan
    rows = []
    for k in segments:
        seg = plan.segments[k]
        tiles = []
        for latent, frame in planning_frames(runner, results, k):
            local = plan.profile.pixel_frames(latent + 1) - 1
            tiles.append((f"{(seg.video_from + local - seg.keep_from) / plan.fps:.1f}s", frame))
        rows.append((f"s{k}", tiles))
    return rows


def planning_frames(runner, results, segment: int) -> list[tuple[int, np.ndarray]]:
    """(latent index, decoded frame) for every micro-plan latent of a segment, in order. Each
    contiguous run of planning latents is decoded as the hand-over decodes its anchor (after the
    first latent and a repeat of the run's first, to warm the causal cache up); a latent's tile is
    the last of its frames."""
    from mmpl_cli.render import to_uint8_frames

    targets = runner.layout.plan.targets
    plan = runner.latents(results, segment, Kind.PLAN)
    first = runner.latents(results, segment, Kind.INITIAL)[:, :1]
    runs: list[list[int]] = []
    for i in targets:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    tiles = []
    for run in runs:
        latents = plan[:, [targets.index(i) for i in run]]
        pixels = runner.backend.decode(torch.cat([first, latents[:, :1], latents], dim=1))
        per = runner.plan.profile.vae_temporal
        frames = to_uint8_frames(pixels[:, -per * len(run):])
        tiles += [(i, frames[per * (k + 1) - 1]) for k, i in enumerate(run)]
    return tiles


def write_when_planned(runner, results, store, done: set[str], progress) -> None:
    """Write the shot's storyboard if every one of its planning tasks is finished."""
    plan = runner.plan
    planning = [t for t in plan.tasks if t.kind == Kind.PLAN]
    if not planning or not all(t.id in done for t in planning):
        return
    png = contact_sheet(shot_rows(runner, results, [t.segment for t in planning]))
    progress.message(f"storyboard: wrote {store.write_storyboard(plan.shot.id, png)}")
