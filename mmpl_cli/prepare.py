"""`mmpl train CONFIG --prepare`: encode the transformer stages' clip pool once, latents and caption
embeddings, into the cache folder (`data.cache`, else <out>/prepared), so that training loads
neither the VAE nor the text encoder beside the transformer (for 14B: 11 GB of UMT5 and the VAE
off every GPU). Resumable shard by shard; under a launcher every process encodes its share.

The cache records what it was made from (data, size, fps, seed, frames, and the contents of the
VAE and text encoder); a stage whose model or data differs refuses it rather than train on it.
"""

from __future__ import annotations

from pathlib import Path

from mmpl_cli.dataset import ClipSource, Pool, check_identity, encode_pool
from mmpl_cli.errors import InputError, Problem


def identity(profile, source: ClipSource, model_dir: Path) -> dict:
    from mmpl_cli.profiles import model_fingerprint

    return {**source.identity(), "frames": profile.segment_frames, "max_sequence_length": profile.max_sequence_length,
            "vae": model_fingerprint(model_dir / "vae"),
            "text": [model_fingerprint(model_dir / part) for part in ("text_encoder", "tokenizer")]}


def prepare_pool(config, profile, source: ClipSource, model_dir: Path, acc, message) -> Path:
    from mmpl_cli.train import StageRun
    from mmpl_cli.wan import WanBackend

    stages = [(i, s) for i, s in enumerate(config.stages) if s.stage == "transformer"]
    if not stages:
        raise InputError(Problem(str(config.path), None, "stages", "expected a transformer stage to prepare data for"))
    first = stages[0][0]
    unfinished = [i for i in range(first) if not StageRun(config.stage_folder(i)).done()]
    if unfinished:
        raise InputError(Problem(str(config.path), None, f"stages[{unfinished[0]}]",
                                 "expected the VAE stages before the first transformer stage to have finished "
                                 "(the prepared latents come from the trained VAE)",
                                 "train them first (a config with those stages alone), then --prepare"))
    clips = max(s.pool for _, s in stages)
    backend = WanBackend.from_folder(model_dir, device=str(acc.device), dtype="float32", attention="native",
                                     max_sequence_length=profile.max_sequence_length)
    folder = config.prepared
    encode_pool(folder, lambda: identity(profile, source, model_dir), clips, backend, source, profile.segment_frames,
                texts=True, rank=acc.process_index, processes=acc.num_processes, wait=acc.wait_for_everyone,
                message=message, name="prepare")
    Pool(folder, clips)  # every shard is there and readable
    message(f"prepared {clips} clips (latents and caption embeddings) in {folder}; "
            f"`mmpl train {config.path}` now trains from them")
    return folder


def check_prepared(config, profile, source: ClipSource, model_dir: Path) -> None:
    check_identity(config.prepared, identity(profile, source, model_dir), create=False)
