"""Video files: write MP4 from frames, stitch MP4s, count frames. Uses the ffmpeg binary that ships
in the imageio-ffmpeg wheel, with commands built by ffmpeg-python. Knows nothing of models.

Files are written under a temporary name in the same folder and renamed into place, so a reader
never sees half a video. Output is H.264, yuv420p, constant frame rate, bit-exact flags on, so the
same frames give the same bytes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import ffmpeg
import imageio_ffmpeg
import numpy as np

from mmpl_cli.errors import MMPLError

BITEXACT = {"fflags": "+bitexact", "flags:v": "+bitexact", "map_metadata": -1}


class VideoError(MMPLError):
    """ffmpeg failed; the message carries the tail of what it printed."""


def ffmpeg_binary() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def _run(stream, path: Path, input_bytes: bytes | None = None) -> None:
    tmp = _tmp(path)
    cmd = stream.output(str(tmp), **BITEXACT).overwrite_output().global_args("-nostdin", "-loglevel", "error")
    args = cmd.compile(cmd=ffmpeg_binary())
    if input_bytes is not None:
        args = [a for a in args if a != "-nostdin"]
    proc = subprocess.run(args, input=input_bytes, capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise VideoError(f"ffmpeg could not write {path}: " + " | ".join(tail))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    """frames: uint8 [F, H, W, 3] RGB -> H.264/yuv420p MP4 at `fps`."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], found {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width, _ = frames.shape
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    _run(_Encoded(stream, fps), path, np.ascontiguousarray(frames).tobytes())
    return path


class _Encoded:
    """An input stream plus the encoder settings every file of ours uses."""

    def __init__(self, stream, fps: int, copy: bool = False):
        self.stream, self.fps, self.copy = stream, fps, copy

    def output(self, filename: str, **kwargs):
        if self.copy:
            return self.stream.output(filename, c="copy", movflags="+faststart", **kwargs)
        return self.stream.output(filename, vcodec="libx264", pix_fmt="yuv420p", r=self.fps, preset="medium",
                                  crf=18, threads=1, movflags="+faststart", **kwargs)


def stitch(parts: Sequence[Path], path: Path, fps: int) -> Path:
    """Join MP4s made by write_mp4 end to end (concat demuxer, no re-encode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    listing = _tmp(path).with_suffix(".txt")
    listing.write_text("".join(f"file '{Path(p).resolve()}'\n" for p in parts))
    try:
        stream = ffmpeg.input(str(listing), format="concat", safe=0)
        _run(_Encoded(stream, fps, copy=True), path)
    finally:
        listing.unlink(missing_ok=True)
    return path


def count_frames(path: Path) -> tuple[int, float]:
    """(frames, fps) of the first video stream, by decoding it with the bundled ffmpeg."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return frames, float(meta["fps"])


def read_frames(path: Path) -> np.ndarray:
    """Decode a video into uint8 [F, H, W, 3]."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
