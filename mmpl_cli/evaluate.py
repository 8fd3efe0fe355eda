"""`mmpl eval`: how much a video drifts, measured on its hue (MMPL paper, Table 5, 13, 14).

Every comparison of two frames is made on their H channel (HSV hue): the hue histogram of each frame
(36 bins of 10 degrees centred on 0, 10, 20 ..., normalised to sum 1), then

* H-L1: the L1 distance between the two histograms, from 0 (same hues) to 2 (no hue in common);
* H-corr: the Pearson correlation between them (OpenCV's HISTCMP_CORREL), 1 for the same hues.

Measured: the first against the last frame (Table 5); the two frames on either side of every
segment join (Table 13) and of every planning-to-content edge inside a segment (Table 14), when the
render folder says where those are; flicker, the mean absolute change between consecutive frames
(0-1 scale); and drift, the H-L1 of the frame at every whole second against the first frame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmpl_cli.errors import InputError, MMPLError, Problem
from mmpl_cli.files import atomic_path

BINS = 36


def _hue(frame: np.ndarray) -> np.ndarray:
    """PIL's hue (0-255 for 0-360 degrees) of every pixel of an RGB uint8 frame [H, W, 3]."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).convert("HSV"))[..., 0].ravel()


def hue_histogram(frame: np.ndarray, hue: np.ndarray | None = None) -> np.ndarray:
    """Normalised histogram of the hue of an RGB uint8 frame [H, W, 3]."""
    hue = _hue(frame) if hue is None else hue
    bins = np.rint(hue.astype(np.float64) * BINS / 256).astype(np.int64) % BINS  # bin 0 centred on red
    counts = np.bincount(bins, minlength=BINS).astype(np.float64)
    return counts / counts.sum()


def background_hue(hue: np.ndarray) -> float:
    """The hue, in degrees, that most of the frame has: the circular mean of the pixels within 15
    degrees of the most common hue (the background, where one colour fills most of the picture)."""
    degrees = hue.astype(np.float64) * (360 / 256)
    counts = np.bincount(np.rint(degrees).astype(np.int64) % 360, minlength=360).astype(np.float64)
    smooth = sum(np.roll(counts, k) for k in range(-5, 6))  # a 11-degree window, round the circle
    mode = float(np.argmax(smooth))
    near = degrees[np.abs((degrees - mode + 180) % 360 - 180) <= 15]
    angle = np.deg2rad(near)
    return float(np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)


def hue_step(a: float, b: float) -> float:
    """Degrees between two hues, the short way round the circle."""
    return float(abs((b - a + 180) % 360 - 180))


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(H-L1, H-corr) of two frames."""
    return _histogram_compare(hue_histogram(a), hue_histogram(b))


@dataclass
class Boundaries:
    """Frames of a video that start something new: a segment, or content after planning (or back)."""

    joins: list[int] = field(default_factory=list)
    plan_content: list[int] = field(default_factory=list)


def boundaries_from_render(render_dir: Path, video: Path) -> Boundaries:
    """Where the segments of `video` (<render_dir>/<shot>.mp4) join, from the render folder's manifest."""
    from mmpl_cli.store import RenderStore

    manifest = RenderStore(Path(render_dir)).read_manifest()
    try:  # a render folder's manifest is untrusted data: anything not of mmpl's shape is refused
        shots = {s["id"]: s for s in manifest.get("shots", [])}
        shot = shots.get(Path(video).stem)
        if shot is None:
            raise InputError(Problem(str(video), None, "--segments-from",
                                     f"no shot '{Path(video).stem}' in the render folder {render_dir} "
                                     f"(shots: {', '.join(map(str, shots))})"))
        segments = shot["segment_plan"]
        boundaries = Boundaries(joins=[int(s["video_frames"][0]) for s in segments[1:]],
                                plan_content=[int(f) for s in segments for f in s.get("plan_content_boundaries", [])])
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, OverflowError) as exc:
        raise InputError(Problem(str(RenderStore(Path(render_dir)).manifest_path), None, "--segments-from",
                                 f"not the manifest mmpl writes ({type(exc).__name__}: {exc})")) from None
    return boundaries


def _summary(pairs: list[tuple[float, float]]) -> dict:
    if not pairs:
        return {"count": 0}
    l1s, corrs = zip(*pairs)
    return {"count": len(pairs), "h_l1_mean": float(np.mean(l1s)), "h_l1_max": float(np.max(l1s)),
            "h_corr_mean": float(np.mean(corrs)), "h_corr_min": float(np.min(corrs))}


def _histogram_compare(ha: np.ndarray, hb: np.ndarray) -> tuple[float, float]:
    l1 = float(np.abs(ha - hb).sum())
    da, db = ha - ha.mean(), hb - hb.mean()
    norm = math.sqrt(float((da * da).sum() * (db * db).sum()))
    return l1, float((da * db).sum() / norm) if norm > 0 else 1.0


STEP_FLOOR = {"deg": 0.1, "h_l1": 0.001}  # a still video's frame-to-frame median is floored here


def _steps(at_joins: list[tuple[float, float]], inside: list[tuple[float, float]]) -> dict:
    """How the picture jumps at the joins against any other pair of consecutive frames: each join's
    background hue step (degrees) and H-L1, over the median of the same figure inside the segments."""
    if not at_joins or not inside:
        return {}
    out = {}
    for column, name in ((0, "deg"), (1, "h_l1")):
        median = max(float(np.median([p[column] for p in inside])), STEP_FLOOR[name])
        values = [p[column] for p in at_joins]
        out[f"step_{name}_mean"] = float(np.mean(values))
        out[f"step_{name}_inside_median"] = median
        out[f"step_ratio_{name}"] = float(np.mean(values)) / median
    return out


def evaluate_frames(frames: Iterable[np.ndarray], fps: float, boundaries: Boundaries | None = None) -> dict:
    """Every metric of one video, given as uint8 frames [H, W, 3] one after another (an array
    [F, H, W, 3] or a stream): only the first and the previous frame are kept, so memory does not
    grow with the video's length. Drift is measured at frame round(s * fps) of every whole second s.
    With boundaries, each join is also measured as a step (`_steps`): the join step ratio is 1.0
    when a join jumps no more than the median pair of consecutive frames inside a segment."""
    joins = set(boundaries.joins) if boundaries else set()
    edges = set(boundaries.plan_content) if boundaries else set()
    first = previous = previous_hist = previous_bg = None
    changes, drift, at_joins, at_edges, steps_at_joins, steps_inside = [], [], [], [], [], []
    count = 0
    for i, frame in enumerate(frames):
        hue = _hue(frame)
        hist, bg = hue_histogram(frame, hue), background_hue(hue) if boundaries is not None else None
        if i == 0:
            first = hist
        else:
            changes.append(float(np.abs(frame.astype(np.int16) - previous.astype(np.int16)).mean()) / 255)
            if boundaries is not None:  # joins and their steps: only where the segments are known
                pair = _histogram_compare(previous_hist, hist)
                if i in joins or i in edges:
                    (at_joins if i in joins else at_edges).append(pair)
                (steps_at_joins if i in joins else steps_inside).append((hue_step(previous_bg, bg), pair[0]))
        while round(len(drift) * fps) <= i:  # every whole second whose frame is this one (fps < 1: several)
            drift.append((len(drift) * fps, _histogram_compare(first, hist)[0]))
        previous, previous_hist, previous_bg, count = frame, hist, bg, i + 1
    if count == 0:
        raise ValueError("the video has no frames")
    l1, corr = _histogram_compare(first, previous_hist)
    changes = changes or [0.0]
    result = {"frames": count, "fps": fps, "first_last": {"h_l1": l1, "h_corr": corr},
              "flicker": {"mean": float(np.mean(changes)), "max": float(np.max(changes))},
              "drift_h_l1": [value for at, value in drift if at <= count - 1]}
    if boundaries is not None:
        result["joins"] = {**_summary(at_joins), **_steps(steps_at_joins, steps_inside)}
        result["plan_content"] = _summary(at_edges)
    return result


def evaluate_video(path: Path, segments_from: Path | None = None) -> dict:
    """evaluate_frames on a video file, decoded as a stream."""
    from mmpl_cli.video import stream_frames

    path = Path(path)
    if not path.is_file():
        raise InputError(Problem(str(path), None, "VIDEO", "no such file"))
    boundaries = boundaries_from_render(segments_from, path) if segments_from is not None else None
    try:
        fps, _, frames = stream_frames(path)
        return {"video": str(path), **evaluate_frames(frames, fps, boundaries)}
    except MMPLError:
        raise
    except Exception as exc:  # noqa: BLE001 - ffmpeg could not read it: bad input, not a crash
        raise InputError(Problem(str(path), None, "VIDEO", f"expected a video ffmpeg can read ({exc})")) from None


def format_table(results: list[dict]) -> str:
    def cell(d: dict, key: str, digits: int = 3) -> str:
        return "-" if not d or d.get("count") == 0 or key not in d else f"{d[key]:.{digits}f}"

    rows = [("video", "first-last H-L1", "H-corr", "joins H-L1", "H-corr", "join step ratio (deg, H-L1)",
             "plan/content H-L1", "H-corr", "flicker", "drift at end")]
    for r in results:
        joins = r.get("joins")
        ratio = "-" if cell(joins, "step_ratio_deg") == "-" else \
            f"{cell(joins, 'step_ratio_deg', 1)}, {cell(joins, 'step_ratio_h_l1', 1)}"
        rows.append((Path(r["video"]).name, f"{r['first_last']['h_l1']:.3f}", f"{r['first_last']['h_corr']:.3f}",
                     cell(joins, "h_l1_mean"), cell(joins, "h_corr_mean"), ratio,
                     cell(r.get("plan_content"), "h_l1_mean"), cell(r.get("plan_content"), "h_corr_mean"),
                     f"{r['flicker']['mean']:.4f}", f"{r['drift_h_l1'][-1]:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def plot_drift(results: list[dict], path: Path, width: int = 900, height: int = 420) -> Path:
    """The per-second H-L1 drift curves of several videos on one chart (PNG)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 60
    longest = max(len(r["drift_h_l1"]) - 1 for r in results) or 1
    peak = max(0.1, max(max(r["drift_h_l1"]) for r in results))
    top_value = math.ceil(peak * 10) / 10

    def xy(second: float, value: float) -> tuple[float, float]:
        return left + (right - left) * second / longest, bottom - (bottom - top) * value / top_value

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        v = top_value * i / 4
        draw.line([xy(0, v), xy(longest, v)], fill=(225, 225, 225))
        draw.text((5, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
    step = max(1, longest // 10)
    for s in range(0, longest + 1, step):
        draw.text((xy(s, 0)[0] - 4, bottom + 5), str(s), fill="black")
    draw.text(((left + right) // 2 - 100, bottom + 22), "seconds; H-L1 to the first frame", fill="black")
    for i, r in enumerate(results):
        colour = COLOURS[i % len(COLOURS)]
        points = [xy(s, v) for s, v in enumerate(r["drift_h_l1"])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((left + 10, top + 8 + 14 * i), Path(r["video"]).name, fill=colour)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def to_json(results: list[dict]) -> str:
    return json.dumps({"bins": BINS, "videos": results}, indent=2)
