"""Training data: clips (procedural, or windows cut from a folder of clip.mp4 + clip.txt pairs) and
the pool of VAE-encoded clips a transformer stage samples from.

A pool is a folder of shards, `POOL_SHARD` clips each: one safetensors file per shard, written
atomically, holding the clips' latents (and, when prepared by `mmpl train CONFIG --prepare`, their
caption embeddings), with captions and first frames in its metadata. A shard that exists is
complete, so encoding resumes shard by shard, and several processes encode disjoint shards. A
reader loads a clip's tensors only when a step asks for it: each process of a data-parallel run
reads only the clips of its own rows. `pool.json` names what the pool was made from (data, size,
seed, and for a prepared pool the VAE's and text encoder's contents); a pool made from anything
else is refused, not used.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.files import MAX_RECORD_BYTES, atomic_path, load_json, write_atomic

POOL_SHARD = 8  # clips per shard, encoded by the VAE as one batch
POOL_FIRST = 10_000_000  # pool clip i is ClipSource.clip(POOL_FIRST + i)


class Clip(NamedTuple):
    frames: np.ndarray  # uint8 [F, H, W, 3]
    caption: str
    first: int  # its first frame's index in the video; 0: the clip starts the video, as a shot starts


class ClipSource:
    """Clips of `frames` frames at the profile's size (and, from a folder, its fps) with their
    captions, clip i fixed by (seed, i)."""

    def __init__(self, source: str, width: int, height: int, seed: int, relative_to: Path, fps: int = 16):
        self.width, self.height, self.seed, self.fps = width, height, seed, fps
        self.folder = None
        if source != "procedural":
            folder = Path(source).expanduser()
            self.folder = folder if folder.is_absolute() else relative_to / folder
            self.videos = sorted(p for p in self.folder.glob("*.mp4") if p.with_suffix(".txt").is_file())
            if not self.videos:
                raise InputError(Problem(str(self.folder), None, "data",
                                         "expected videos (*.mp4) with captions beside them (*.txt of the same name)"))

    def identity(self) -> dict:
        """What the clips are a function of: a folder's videos by name, size and modification time."""
        import hashlib

        listing = hashlib.sha256()
        for video in self.videos if self.folder else []:
            for path in (video, video.with_suffix(".txt")):
                info = path.stat()
                listing.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}\n".encode())
        return {"data": str(self.folder) if self.folder else "procedural", "videos": listing.hexdigest(),
                "size": [self.width, self.height], "fps": self.fps, "seed": self.seed}

    def clip(self, index: int, frames: int) -> Clip:
        from mmpl_cli import procedural

        rng = random.Random(self.seed * 1_000_003 + index)
        if self.folder is None:
            scene = procedural.scene_from_seed(rng.randrange(1 << 30))
            first = rng.randrange(0, 3) * 76  # later windows too: the shape after a bounce
            return Clip(procedural.render_scene(scene, frames, self.width, self.height, first), scene.caption(), first)
        from mmpl_cli.video import read_frames

        video = self.videos[rng.randrange(len(self.videos))]
        # decoded by the renderer's ffmpeg at the profile's fps and size
        pixels = read_frames(video, fps=self.fps, size=(self.width, self.height))
        if not len(pixels):
            raise InputError(Problem(str(video), None, "data", "expected a video with frames, found none"))
        first = rng.randrange(0, max(1, len(pixels) - frames + 1))
        pixels = pixels[first:first + frames]
        if len(pixels) < frames:  # short videos repeat their last frame
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], frames - len(pixels), axis=0)])
        return Clip(pixels, video.with_suffix(".txt").read_text(errors="replace").strip(), first)


def to_model_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)


# --------------------------------------------------------------------------------------------
# The pool


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"pool-{shard:05d}.safetensors"


def encode_pool(folder: Path, identity: Callable[[], dict], clips: int, backend, source: ClipSource, frames: int,
                texts: bool, rank: int = 0, processes: int = 1, wait: Callable[[], None] = lambda: None,
                message: Callable[[str], None] = print, name: str = "pool") -> None:
    """Make sure shards 0 .. ceil(clips / POOL_SHARD) - 1 exist in `folder`, this process writing the
    missing ones whose number is `rank` modulo `processes` (latents; with `texts`, caption embeddings).
    Every process of the run calls it: the main one first checks or writes the pool's record
    (`identity()`, computed there only: it may hash weights), all wait for that, encode, and wait
    for each other (`wait`)."""
    from safetensors.torch import save_file

    if rank == 0:
        check_identity(folder, identity(), create=True)
    wait()
    folder.mkdir(parents=True, exist_ok=True)
    shards = range((clips + POOL_SHARD - 1) // POOL_SHARD)
    mine = [k for k in shards if k % processes == rank and not shard_path(folder, k).is_file()]
    if mine:
        message(f"{name}: encoding {len(mine)} shard(s) of {POOL_SHARD} clips ({frames} frames) in {folder}")
    for done, k in enumerate(mine, 1):
        batch = [source.clip(POOL_FIRST + i, frames) for i in range(k * POOL_SHARD, (k + 1) * POOL_SHARD)]
        latents = backend.encode(torch.stack([to_model_pixels(c.frames) for c in batch]))
        tensors = {f"latents.{k * POOL_SHARD + j}": z.contiguous() for j, z in enumerate(latents)}
        if texts:
            tensors.update({f"text.{k * POOL_SHARD + j}": backend.encode_text(c.caption)[0].clone()
                            for j, c in enumerate(batch)})  # clones: a caption that recurs is one cached tensor
            tensors["text.empty"] = backend.encode_text("")[0].clone()
        about = json.dumps([{"caption": c.caption, "first": c.first} for c in batch])
        with atomic_path(shard_path(folder, k)) as tmp:
            save_file({n: t.cpu() for n, t in tensors.items()}, tmp, metadata={"about": about})
        if done == len(mine) or done % max(1, len(mine) // 8) == 0:
            message(f"{name}: encoded {done}/{len(mine)} shard(s)")
    wait()


def check_identity(folder: Path, identity: dict, create: bool) -> None:
    """pool.json must name what the caller would encode; written when missing (by `create`)."""
    path = folder / "pool.json"
    try:
        found = load_json(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(identity, indent=2) + "\n")
        return
    except (OSError, ValueError) as exc:
        raise InputError(Problem(str(path), None, "pool", f"cannot read the pool's record: {exc}")) from None
    if found != identity:
        changed = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
        raise InputError(Problem(str(folder), None, "pool",
                                 f"expected a pool made from this config's data and model, found one that differs "
                                 f"in {', '.join(changed)}", f"delete {folder} or run `mmpl train CONFIG --prepare` again"))


class Pool:
    """A pool folder's first `clips` clips, read lazily: latents(i), text(i), caption(i), first(i)."""

    def __init__(self, folder: Path, clips: int):
        self.folder, self.clips = folder, clips
        self._handles: dict[int, object] = {}
        self.about: list[dict] = []
        for k in range((clips + POOL_SHARD - 1) // POOL_SHARD):
            path = shard_path(folder, k)
            if not path.is_file():
                raise InputError(Problem(str(path), None, "pool", "expected a shard of the pool, found none",
                                         "run `mmpl train CONFIG --prepare` to finish it"))
            try:
                about = json.loads(self._shard(k).metadata()["about"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(Problem(str(path), None, "pool", f"expected a pool shard, found {exc}")) from None
            self.about.extend(about)
        self.about = self.about[:clips]

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(str(shard_path(self.folder, k)), framework="pt")
        return self._handles[k]

    def latents(self, i: int) -> torch.Tensor:
        return self._shard(i // POOL_SHARD).get_tensor(f"latents.{i}")

    def text(self, i: int | None) -> torch.Tensor:
        """Caption embedding [1, tokens, dim] of clip i, or of the empty caption (None)."""
        return (self._shard(0).get_tensor("text.empty") if i is None
                else self._shard(i // POOL_SHARD).get_tensor(f"text.{i}"))[None]

    def caption(self, i: int) -> str:
        return self.about[i]["caption"]

    def first(self, i: int) -> int:
        return self.about[i]["first"]
