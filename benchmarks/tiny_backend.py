"""The opening the tiny-model benchmarks share: the `tiny` profile and a backend on its embedded
default, or on the Diffusers folder given by `--model-path` (say runs/tiny/model after `mmpl train`)."""

from __future__ import annotations

from pathlib import Path

from mmpl_cli.profiles import Profile, load_profile
from mmpl_cli.wan import WanBackend


def tiny_backend(model_path: str | None) -> tuple[Profile, Path, WanBackend]:
    """(the tiny profile, the model folder, a backend on it)."""
    profile = load_profile("tiny")
    root = Path(model_path) if model_path else profile.resolve_model_path(None)
    return profile, root, WanBackend.from_folder(root, max_sequence_length=profile.max_sequence_length)
