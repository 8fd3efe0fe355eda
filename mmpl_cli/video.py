"""Video files: write MP4 from frames, stitch MP4s, count frames. Uses the ffmpeg binary that ships
in the imageio-ffmpeg wheel, with commands built by ffmpeg-python. Knows nothing of models.

Writes exactly the path it is given; making that atomic is the caller's business (the store
writes to a temporary name and renames). Output is H.264, yuv420p, constant frame rate, bit-exact
flags on, so the same frames give the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
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


_messages = threading.local()


def _messages_file():
    """This thread's file for ffmpeg's messages, emptied for each run. One file per thread, kept
    open, rather than one per run: each file made and freed costs every later file creation on
    ext4 without a journal a scan past it for minutes (the kernel's recently_deleted), and a batch
    makes three videos a shot."""
    held = getattr(_messages, "file", None)
    if held is None or held[0] != os.getpid():  # a forked child gets its own
        held = _messages.file = (os.getpid(), tempfile.TemporaryFile())
    messages = held[1]
    messages.seek(0)
    messages.truncate()
    return messages


def _run(stream, path: Path, input_bytes: bytes | None = None) -> None:
    cmd = stream.output(str(path), **BITEXACT).overwrite_output().global_args("-nostdin", "-loglevel", "error")
    args = cmd.compile(cmd=ffmpeg_binary())
    if input_bytes is not None:
        args = [a for a in args if a != "-nostdin"]
    # ffmpeg's messages go to a file, not a pipe, so the input goes to its stdin in one blocking write:
    # subprocess.run(input=...) would feed it 4 KiB per poll (24,000 rounds for a 832x480 segment)
    messages = _messages_file()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL if input_bytes is None else subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=messages)
    except OSError as exc:
        raise VideoError(f"cannot run ffmpeg ({args[0]}): {exc.strerror or exc}") from None
    try:
        if input_bytes is not None:
            try:
                proc.stdin.write(input_bytes)
            except BrokenPipeError:
                pass  # ffmpeg stopped reading: its exit status and messages say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        proc.wait()
    except BaseException:  # interrupted: no ffmpeg is left behind writing the temporary file
        proc.kill()
        proc.wait()
        raise
    # at -loglevel error ffmpeg prints errors only, and one without a failing exit is still a failure:
    # a part of a stitch that cannot be opened is said and skipped, exit 0, the video cut short (-xerror
    # would end it, but also ends on a timestamp warning that ffmpeg otherwise mends)
    messages.seek(0)
    said = messages.read().decode(errors="replace").strip()
    if proc.returncode != 0 or said:
        tail = said.splitlines()[-5:]
        raise VideoError(f"ffmpeg failed (exit {proc.returncode}) writing {path.name}: " + " | ".join(tail))


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    """frames: uint8 [F, H, W, 3] RGB -> H.264/yuv420p MP4 at `fps`."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], found {frames.dtype} {frames.shape}")
    path = Path(path)
    _, height, width, _ = frames.shape
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
    """Join MP4s made by write_mp4 end to end (concat demuxer, no re-encode). The list of parts goes
    to ffmpeg's stdin (no file made and freed per shot), each as a `file:` URL, so that it is not read
    relative to `pipe:`, quoted as the demuxer reads quotes: a folder named `Bob's renders` works."""
    path = Path(path)
    listing = "".join(f"file {_quoted('file:' + str(Path(p).resolve()))}\n" for p in parts)
    stream = ffmpeg.input("pipe:", format="concat", safe=0, protocol_whitelist="file,pipe")
    _run(_Encoded(stream, fps, copy=True), path, listing.encode())
    return path


def _quoted(text: str) -> str:
    """`text` in single quotes for ffmpeg's concat list, a quote in it written '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"


def count_frames(path: Path) -> tuple[int, float]:
    """(frames, fps) of the first video stream, by decoding it with the bundled ffmpeg."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return frames, float(meta["fps"])


def stream_frames(path: Path) -> tuple[float, tuple[int, int], Iterator[np.ndarray]]:
    """(fps, (width, height), frames): the video decoded one uint8 [H, W, 3] frame at a time, so
    that memory does not grow with its length."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    return float(meta["fps"]), (width, height), (np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader)


def read_frames(path: Path, fps: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a whole video into uint8 [F, H, W, 3], resampled by ffmpeg to `fps` and scaled
    (bicubic) to `size` (width, height) when given."""
    if fps is None and size is None:
        _, (width, height), frames = stream_frames(path)
        frames = list(frames)
        return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
    filters = ([f"fps={fps}"] if fps else []) + ([f"scale={size[0]}:{size[1]}:flags=bicubic"] if size else [])
    logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)  # "frame size differs from the source": asked for
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=["-vf", ",".join(filters)])
    width, height = next(reader)["size"]  # what ffmpeg outputs
    frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
