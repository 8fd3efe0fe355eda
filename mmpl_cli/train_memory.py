"""mmpl's memory model of a training process: what one process holds on its device at the peak of
a transformer step, printed before training (`mmpl train CONFIG --estimate` prints it alone) and
checked against the device's memory before the first step.

Per process, for the config's stages, process count, sharding and mixed precision:

* weights: the transformer in float32 (the master copy; mixed precision computes in bf16/fp16
  under autocast), divided by the processes under a full shard, plus one block gathered in the
  compute dtype (two: the next is prefetched); the VAE and text encoder unless the data is prepared;
* gradients (float32) and AdamW's two moments (float32) of the trainable parameters; sharded alike;
  without a shard, data parallelism adds its gradient buckets (one more copy of the gradients);
* activations: per block, per token of the training pass (context and targets: a segment's
  latents) the tensors autograd saves for backward, ACT_BYTES: 88 d + 8 f bytes in float32, 68 d + 4 f
  with bf16 autocast (d the width, f the feed-forward width), and per text token and block 16 d
  (12 d); with checkpointing only each block's input (4 d or 2 d bytes per token) plus one block's
  activations while it is recomputed; autocast's bf16 copies of the weights (2 bytes per block
  parameter, every block without checkpointing); the masked pass's block mask (bool, and the
  kernel's additive copy in the compute dtype); and the backward's working set (about 2 f + 4 d
  values per token).

ACT_BYTES was measured with autograd's saved-tensor hooks on diffusers' Wan block at the 1.3B width
(88.1 d + 8 f; bf16 68.1 d + 4 f) and agrees at the 14B width within 0.1% (dev/LOG.md, 2026-12-02);
tests/test_train_scale.py measures it again. Pure arithmetic: no torch import.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmpl_cli.memory import GB, Architecture, architecture_of

# bytes saved for backward per token per block, as (per d, per f), and per text token per block (per d)
ACT_BYTES = {"no": (88, 8, 16), "bf16": (68, 4, 12), "fp16": (68, 4, 12)}
SHARDINGS = ("none", "full")


def block_params(arch: Architecture) -> int:
    return sum(arch.block_params())


def trainable_params(arch: Architecture, subset: str) -> int:
    """Parameters that recipe.trainable_names picks (by name) for a Table 3 subset, counted from the
    configuration: self-attention is q, k, v, out and the q/k norms of every block's attn1; `qk` its
    to_q and to_k only; `all` every parameter (not the RoPE tables, which are buffers). A test
    counts the names' parameters on a meta-device model of each released architecture."""
    d, layers = arch.dim, arch.transformer["num_layers"]
    if subset == "self_attention":
        return layers * (4 * (d * d + d) + 2 * d)
    if subset == "qk":
        return layers * 2 * (d * d + d)
    return arch.transformer_bytes("float32") // 4 - arch.rope_values()


def estimate(arch: Architecture, profile, stage, processes: int, sharding: str, checkpointing: bool,
             mixed_precision: str, prepared: bool) -> dict[str, float]:
    """Bytes per process at the peak of a transformer step, by part (see the module docstring)."""
    c, d = arch.transformer, arch.dim
    f, layers = c["ffn_dim"], c["num_layers"]
    _, ph, pw = c["patch_size"]
    tokens = profile.layout.latents * (profile.height // profile.vae_spatial // ph) * (profile.width // profile.vae_spatial // pw)
    text = profile.max_sequence_length
    clips = stage.batch // (processes * stage.accumulation)
    shard = processes if sharding == "full" else 1
    compute = 4 if mixed_precision == "no" else 2
    per_d, per_f, per_text = ACT_BYTES[mixed_precision]
    block = clips * (tokens * (per_d * d + per_f * f) + text * per_text * d)
    copies = 2 * block_params(arch) if mixed_precision != "no" else 0
    if checkpointing:
        activations = clips * layers * tokens * d * compute + block + copies
    else:
        activations = layers * (block + copies)
    trainable = trainable_params(arch, stage.trainable)
    parts = {
        "weights": arch.transformer_bytes("float32") / shard + (2 * block_params(arch) * compute if shard > 1 else 0),
        "text encoder and VAE": 0 if prepared else arch.text_encoder_bytes("float32") + arch.vae_bytes(),
        "gradients": 4 * trainable / shard * (2 if processes > 1 and shard == 1 else 1),
        "optimizer": 8 * trainable / shard,
        "activations": activations,
        "mask and backward": clips * (tokens * tokens * (1 + compute) + tokens * (2 * f + 4 * d) * 4),
    }
    parts["total"] = sum(parts.values())
    return parts


def size(n: float) -> str:
    return f"{n / GB:8.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:8.1f} MB"


def describe(parts: dict[str, float], name: str, processes: int, sharding: str, checkpointing: bool,
             memory_gb: float | None) -> list[str]:
    lines = [f"{name}: memory per process ({processes} process(es), sharding {sharding}, "
             f"checkpointing {'on' if checkpointing else 'off'})"]
    lines += [f"  {part:<22}{size(value)}" for part, value in parts.items()]
    if parts["text encoder and VAE"]:
        lines.append(f"  {'total with --prepare':<22}{size(parts['total'] - parts['text encoder and VAE'])}")
    if memory_gb is not None:
        verdict = "fits" if parts["total"] / GB <= memory_gb else "DOES NOT FIT"
        lines.append(f"  {'device memory':<22}{size(memory_gb * GB)}: {verdict}")
    return lines


def device_memory_gb(config, acc) -> float | None:
    """The config's memory_gb, else the CUDA device's total memory; None on the CPU (not checked)."""
    if config.memory_gb is not None:
        return config.memory_gb
    if acc is not None and acc.device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(acc.device).total_memory / GB
    return None


def estimates(config, profile, root: Path | None, processes: int, memory_gb: float | None, message) -> list[str]:
    """Print the estimate of every transformer stage; the names of those that do not fit."""
    from mmpl_cli.memory import model_folder

    arch = architecture_of(profile, root or model_folder(profile))
    if arch is None:
        message("memory estimate: the model's architecture is unknown (no configs, no model.architecture)")
        return []
    prepared = config.is_prepared
    too_big = []
    for index, stage in enumerate(config.stages):
        if stage.stage != "transformer":
            continue
        if stage.batch % (processes * stage.accumulation):
            continue  # refused as it starts, with its own message
        parts = estimate(arch, profile, stage, processes, config.sharding, config.gradient_checkpointing,
                         config.mixed_precision, prepared and not stage.text_encoder)
        name = f"stage {index + 1} (transformer, {stage.trainable})"
        for line in describe(parts, name, processes, config.sharding, config.gradient_checkpointing, memory_gb):
            message(line)
        if memory_gb is not None and parts["total"] / GB > memory_gb:
            too_big.append(f"stages[{index}] needs {math.ceil(parts['total'] / GB)} GB per process")
    return too_big


def check_fits(config, profile, root: Path | None, acc, message) -> None:
    """Before the first step: the estimate, and a clear refusal when it cannot fit."""
    from mmpl_cli.errors import InputError, Problem

    memory_gb = device_memory_gb(config, acc)
    too_big = estimates(config, profile, root, acc.num_processes, memory_gb, message)
    if too_big:
        raise InputError(Problem(str(config.path), None, "stages",
                                 f"expected training to fit {memory_gb:.0f} GB per process, found: {'; '.join(too_big)}",
                                 "shard the transformer (sharding: full) over more processes, turn on "
                                 "gradient_checkpointing, use mixed_precision: bf16, or train fewer parameters"))
