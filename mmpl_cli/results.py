"""What a task makes, and how a task file holds it: the result types the tasks return and the
store saves, and the safetensors format mmpl writes (float32 tensors, each with a SHA-256 of its
bytes in the metadata), read back without torch so that checking a folder's files is cheap.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpl_cli.files import MAX_RECORD_BYTES, parse_json

MAX_CANDIDATE = 64  # the noise search's most candidates (profiles: search <= 64)


@dataclass(frozen=True)
class Latents:
    """A denoising task's result: its latents [C, F, H, W], for a chained task what it hands on
    (progressive: the noisy window), and which noise candidate the k-step noise search chose (0:
    the segment's own noise), so that later groups blend their edge noise from that one."""

    latents: Any  # torch.Tensor; typed loosely so this module does not import torch
    window: Any = None
    candidate: int = 0


@dataclass(frozen=True)
class VideoFile:
    """A video task's result: the MP4 it wrote into the folder."""

    path: Path


Result = Latents | VideoFile


@dataclass(frozen=True)
class Frames:
    """A decode task's result before it is a file: the segment's frames (uint8 [F, H, W, 3]), for
    the runtime to encode into `target`."""

    frames: Any  # numpy.ndarray
    target: Path


@dataclass(frozen=True)
class Parts:
    """A stitch task's result before it is a file: the segments' videos, for the runtime to join."""

    parts: list[Path]
    target: Path


Made = Latents | Frames | Parts  # what a task returns


def tensor_checksum(tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def tensors_from(parts: dict) -> dict:
    """float32_tensors' parts as torch tensors (the same bytes: nothing parsed a second time)."""
    import torch

    return {name: torch.frombuffer(data, dtype=torch.float32).reshape(shape) for name, (shape, data) in parts.items()}


def latents_from(tensors: dict) -> Latents:
    """What a task file holds, read back (its candidate checked by candidate_of from the same bytes)."""
    candidate = tensors.get("candidate")
    return Latents(tensors["latents"], tensors.get("window"), 0 if candidate is None else int(candidate.flatten()[0]))


def float32_tensors(raw: bytes) -> tuple[dict, dict[str, tuple[list[int], bytearray]]]:
    """(metadata, {name: (shape, data)}) of a safetensors file whose tensors are all float32 (what
    mmpl writes), read without torch by safetensors' own parser (so a file it accepts here is one
    `safetensors.torch.load` accepts later); ValueError for anything else. The data are the bytes a
    tensor_checksum hashes: float32, little-endian, in order."""
    from safetensors import SafetensorError, deserialize

    if len(raw) < 8 or int.from_bytes(raw[:8], "little") > min(len(raw) - 8, MAX_RECORD_BYTES):
        raise ValueError("no safetensors header")
    try:
        tensors = deserialize(raw)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise ValueError(str(exc).split("\n")[0][:120]) from None
    meta = parse_json(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__") or {}  # checked above
    parts = {}
    for name, info in tensors:
        if info["dtype"] != "F32":
            raise ValueError(f"{name} is not float32")
        parts[name] = (list(info["shape"]), info["data"])
    return meta, parts


def header_of(path: str) -> tuple[dict, list[str]]:
    """(metadata, tensor names) of a safetensors file from its header alone, as float32_tensors
    accepts it (every tensor float32, the offsets covering the rest of the file exactly, checked by
    safetensors) without reading or hashing the tensors: enough to know that a file another worker
    has just written is this task's. ValueError otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as found:
            meta, names = found.metadata() or {}, list(found.keys())
            odd = next((name for name in names if found.get_slice(name).get_dtype() != "F32"), None)
    except (SafetensorError, OSError) as exc:
        raise ValueError(str(exc).split("\n")[0][:120]) from None
    if odd is not None:
        raise ValueError(f"{odd} is not float32")
    return meta, names


def candidate_of(parts: dict) -> int:
    """The noise search's choice a task file records (0: none); ValueError for one it cannot have made."""
    if "candidate" not in parts:
        return 0
    shape, data = parts["candidate"]
    value = struct.unpack("<f", data)[0] if math.prod(shape) == 1 else -1.0
    if not (value.is_integer() and 0 < value < MAX_CANDIDATE):
        raise ValueError("candidate out of range")
    return int(value)


def checksum_key(tensor_name: str) -> str:
    """Metadata key of a task file's tensor checksum ("checksum" for the latents, as files always had)."""
    return "checksum" if tensor_name == "latents" else f"checksum.{tensor_name}"
