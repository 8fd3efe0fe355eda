"""mmpl's own memory model: the peak device memory of each task kind and seeding mode.

From the model's configs (transformer, text encoder, VAE), the profile's size, dtype and layout,
and whether the text encoder and VAE are offloaded, it adds up what a task holds on the device at
its peak, as mmpl's backend holds it:

* weights: the transformer in the profile's dtype (diffusers keeps its time embedder, norms and
  modulation tables in float32), the VAE in float32, the text encoder unless offloaded;
* the context cache: one buffer per layer per text (two with guidance), K and V, for every token of
  the task's context groups (wan.ContextCache), allocated when the first group is recorded;
* activations of the task's largest forward, each context group's pass at t = 0 included: the
  feed-forward phase (its [tokens, ffn] input and output beside four [tokens, dim] states), the
  self-attention phase (q, k, v, output and the residual stream, with the visible keys and values
  joined to the group's own) or the cross-attention phase (the prompt's keys and values), whichever
  is largest, with the prompt projected to the model's width held throughout; a fused attention
  kernel holds no score matrix;
* VAE decode or encode: bytes per output pixel per unit of the VAE's base width, measured on the
  Wan2.1 VAE (see VAE_DECODE_BYTES), plus the decoded pixels in float32.

It is checked against measurement in tests/test_memory.py (the stand-in device's meter, real-width
models with their depth cut, two sizes) and against the MMPL paper's Table 11 for the 14B model;
benchmarks/gpu_check.py prints it beside `torch.cuda.max_memory_allocated`. Pure Python: `mmpl plan`
imports no torch. A profile's `memory_gb` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mmpl_cli.files import load_json

from mmpl_cli.terms import CAUSAL_BLOCK, GROUPS, SEEDINGS, Kind, Seeding

MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few KB

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The released architectures (Wan2.1 technical report; the Diffusers folders' configs), for profiles
# whose weights are not on this machine (`model.architecture`) and for tests at real width.
WAN_TRANSFORMERS = {
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
WAN21_VAE = dict(base_dim=96, z_dim=16, params=126_892_531)  # diffusers' AutoencoderKLWan() (a test counts it)

# Bytes the Wan2.1 VAE holds per output pixel, per unit of its base width, in float32: measured with
# the stand-in device's meter at 64x48 and 128x96 (decode 19.57 and 19.65 KB per pixel at base 96,
# encode 12.2 and 12.3; dev/LOG.md, 2026-12-02). Decoding works latent by latent, so the frame count
# does not enter; only the decoded pixels, held at the end, grow with it.
VAE_DECODE_BYTES = 204.0
VAE_ENCODE_BYTES = 128.0


@dataclass(frozen=True)
class Architecture:
    transformer: dict
    text_encoder: dict
    vae_base_dim: int
    vae_params: int

    @classmethod
    def from_folder(cls, root: Path) -> "Architecture":
        """The configs of a Diffusers-format Wan folder; the VAE's size from its weights' header."""
        root = Path(root)
        read = lambda name: load_json(root / name / "config.json", MAX_CONFIG_BYTES)  # noqa: E731
        vae = read("vae")
        return cls(read("transformer"), read("text_encoder"), vae.get("base_dim", 96), _safetensors_params(root / "vae"))

    @classmethod
    def named(cls, name: str) -> "Architecture":
        return cls(WAN_TRANSFORMERS[name], UMT5_XXL, WAN21_VAE["base_dim"], WAN21_VAE["params"])

    # -- parameters ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]

    def transformer_bytes(self, dtype: str) -> int:
        """diffusers' WanTransformer3DModel: parameters in `dtype`, except the float32 ones it keeps
        (time embedder, modulation tables, the affine cross-attention norm), and the RoPE tables."""
        c, d = self.transformer, self.dim
        pt, ph, pw = c["patch_size"]
        patch = pt * ph * pw
        t, q = c["text_dim"], c["freq_dim"]
        in_dtype = (c["in_channels"] * patch * d + d  # patch embedding
                    + d * 6 * d + 6 * d  # time projection
                    + t * d + d + d * d + d  # text embedder
                    + d * c["out_channels"] * patch + c["out_channels"] * patch)  # head
        per_block, fp32_block = self.block_params()
        fp32 = q * d + d + d * d + d + 2 * d  # time embedder, head modulation
        layers = c["num_layers"]
        return (in_dtype + layers * per_block) * DTYPE_BYTES[dtype] + (fp32 + layers * fp32_block) * 4 + self.rope_values() * 4

    def rope_values(self) -> int:
        """The RoPE tables' values (float32 buffers, not parameters)."""
        return 2 * self.transformer.get("rope_max_seq_len", 1024) * self.transformer["attention_head_dim"]

    def block_params(self) -> tuple[int, int]:
        """One Wan block's parameters: (in the model's dtype, kept in float32 by diffusers)."""
        d, f = self.dim, self.transformer["ffn_dim"]
        in_dtype = 8 * (d * d + d) + 4 * d + 2 * d * f + f + d  # self and cross attention, q/k norms, ffn
        fp32 = 6 * d + (2 * d if self.transformer.get("cross_attn_norm") else 0)  # modulation, affine norm2
        return in_dtype, fp32

    def text_encoder_bytes(self, dtype: str) -> int:
        """transformers' UMT5EncoderModel: embeddings, and per layer attention (with its own relative
        position bias), a gated feed-forward and two norms. Never float16 (wan.text_dtype)."""
        c = self.text_encoder
        inner = c["num_heads"] * c["d_kv"]
        per_layer = (4 * c["d_model"] * inner + c["relative_attention_num_buckets"] * c["num_heads"]
                     + 3 * c["d_model"] * c["d_ff"] + 2 * c["d_model"])
        params = c["vocab_size"] * c["d_model"] + c["num_layers"] * per_layer + c["d_model"]
        return params * DTYPE_BYTES["bfloat16" if dtype == "float16" else dtype]

    def vae_bytes(self) -> int:
        return self.vae_params * 4  # mmpl runs the VAE in float32


def _safetensors_params(folder: Path) -> int:
    """Elements in a folder's safetensors files, from their headers (nothing else is read)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as fh:
                total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a damaged or foreign file
            raise ValueError(f"{path.name} is not a readable safetensors file ({exc})") from None
    return total


def _has_configs(root: Path | None) -> bool:
    return root is not None and all((Path(root) / n / "config.json").exists() for n in ("transformer", "text_encoder", "vae"))


def model_folder(profile) -> Path | None:
    """Where the profile's weights would be, or None when its path cannot be resolved here."""
    try:
        return profile.resolve_model_path()
    except Exception:  # noqa: BLE001 - an unresolvable path only means: use the named architecture
        return None


def architecture_of(profile, root: Path | None) -> Architecture | None:
    """The model folder's architecture, or the profile's named one when its weights are elsewhere.
    A folder whose configs do not parse is bad input (InputError), as loading it would be."""
    if _has_configs(root):
        try:
            return Architecture.from_folder(root)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            from mmpl_cli.errors import InputError, Problem

            raise InputError(Problem(str(root), None, "model.path", f"cannot read the model's configs: {exc}")) from None
    name = getattr(profile, "architecture", None)
    return Architecture.named(name) if name else None


# --------------------------------------------------------------------------------------------
# Peaks per task kind


@dataclass(frozen=True)
class Peak:
    """What one task holds on the device at its peak, in bytes."""

    weights: int
    cache: int = 0
    activations: int = 0
    text: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations + self.text

    def summary(self) -> dict:
        return {"total_gb": round(self.total / GB, 2), "weights_gb": round(self.weights / GB, 2),
                "cache_gb": round(self.cache / GB, 2), "activations_gb": round(self.activations / GB, 2)}


def forward_bytes(arch: Architecture, tokens: int, visible: int, text_tokens: int, dtype: str,
                  per_token_timesteps: bool = False) -> int:
    """The largest moment of one transformer forward over `tokens` tokens that also attends to
    `visible` cached tokens, with the prompt projected to the model's width (held through every
    block): the feed-forward, self-attention or cross-attention phase (see the module docstring)."""
    b, d, f, s = DTYPE_BYTES[dtype], arch.dim, arch.transformer["ffn_dim"], text_tokens
    ffn = (2 * tokens * f + 4 * tokens * d + s * d) * b
    self_attention = (8 * tokens + 2 * visible + s) * d * b
    cross_attention = (5 * tokens + 5 * s) * d * b  # the prompt's keys and values beside the states
    modulation = 6 * tokens * d * 4 if per_token_timesteps else 0  # diffusers' per-token [tokens, 6, dim] table
    return max(ffn, self_attention, cross_attention) + modulation


def task_peaks(arch: Architecture, profile, seeding: str, offload: bool) -> dict[str, Peak]:
    """Peak of every task kind an MMPL render in `seeding` runs, and of the baselines' kinds."""
    b = DTYPE_BYTES[profile.dtype]
    c = arch.transformer
    _, ph, pw = c["patch_size"]
    lat_h, lat_w = profile.height // profile.vae_spatial, profile.width // profile.vae_spatial
    per_latent = (lat_h // ph) * (lat_w // pw)
    pixels = profile.height * profile.width
    texts = 2 if profile.sampler.guidance != 1.0 else 1
    text = texts * profile.max_sequence_length * arch.text_encoder["d_model"] * b  # the prompts' embeddings, kept
    transformer, vae, encoder = arch.transformer_bytes(profile.dtype), arch.vae_bytes(), arch.text_encoder_bytes(profile.dtype)
    resident = transformer + (0 if offload else vae + encoder)
    with_vae = transformer + vae + (0 if offload else encoder)

    def cache(latents: int) -> int:
        return texts * c["num_layers"] * 2 * latents * per_latent * arch.dim * b

    def denoise(targets, sees, context_kinds) -> Peak:
        layout = profile.layout
        groups = [layout.group(k) for k in context_kinds]
        recorded: list[int] = []
        forwards = []
        for g in groups:  # each context group's pass at t = 0, seeing what it saw
            forwards.append((len(g.targets), sum(1 for f in recorded if f in set(g.sees))))
            recorded += list(g.targets)
        forwards.append((len(targets), sum(1 for f in recorded if f in set(sees))))
        act = max(forward_bytes(arch, n * per_latent, v * per_latent, profile.max_sequence_length, profile.dtype)
                  for n, v in forwards)
        return Peak(resident, cache(len(recorded)), act, text)

    def decode(latents: int) -> Peak:
        frames = profile.pixel_frames(latents)
        return Peak(with_vae, 0, int(VAE_DECODE_BYTES * arch.vae_base_dim * pixels) + 3 * frames * pixels * 4)

    layout = profile.layout
    groups = layout.groups()
    peaks = {Kind.INITIAL: denoise(layout.initial, (), [])}
    for i, kind in enumerate(GROUPS[1:], 1):  # each group with the groups made before it as context
        context = list(GROUPS[:i])
        if kind == Kind.POPULATE_TWO and seeding != Seeding.TERMINAL:
            continue
        peaks[kind] = denoise(groups[kind].targets, groups[kind].sees, context)
    # the text encoder's visit: offloaded, it comes to the device beside the transformer to encode a prompt
    peaks["encode_text"] = Peak(transformer + encoder + (0 if offload else vae), 0, 0, text)
    # the hand-over decodes a run that ends with the anchor (render._handover), then encodes its tail
    anchor = layout.anchor(seeding)
    run = (1 + sum(1 for i in layout.plan.targets if i <= max(anchor)) if profile.handover == "planning"
           else 2 + len(anchor))
    peaks["handover"] = Peak(with_vae, 0, max(decode(run).activations, int(VAE_ENCODE_BYTES * arch.vae_base_dim * pixels)))
    peaks[Kind.DECODE] = decode(layout.decoded(seeding, profile.decode == "after-previous"))  # a later segment's, if longer
    n = layout.latents
    peaks[Kind.FULL] = Peak(resident, 0, forward_bytes(arch, n * per_latent, 0, profile.max_sequence_length, profile.dtype), text)
    # causal: the window's cache, and its last block seeing every latent before it
    block = min(CAUSAL_BLOCK, n)
    peaks[Kind.CAUSAL] = Peak(resident, cache(n), forward_bytes(arch, block * per_latent, (n - block) * per_latent,
                                                                profile.max_sequence_length, profile.dtype), text)
    return peaks


def seeding_peaks(arch: Architecture, profile, offload: bool) -> dict[str, dict]:
    """Per seeding mode: its peak (the largest task's) and every task kind's, for `mmpl plan`."""
    out = {}
    for seeding in SEEDINGS:
        peaks = task_peaks(arch, profile, seeding, offload)
        mmpl_kinds = {k: v for k, v in peaks.items() if k not in (Kind.FULL, Kind.CAUSAL)}
        worst = max(mmpl_kinds, key=lambda k: mmpl_kinds[k].total)
        out[seeding] = {"peak_gb": round(mmpl_kinds[worst].total / GB, 2), "largest_task": worst,
                        "tasks": {k: v.summary() for k, v in peaks.items()}}
    return out


def estimate(profile, root: Path | None, free_gb: float | None = None) -> dict | None:
    """The memory model for a profile: per seeding mode, with the text encoder and VAE resident and
    offloaded, and what `offload: auto` would choose on a GPU with `free_gb` free. None when the
    architecture is unknown (no folder, no `model.architecture`)."""
    arch = architecture_of(profile, root)
    if arch is None:
        return None
    resident, offloaded = seeding_peaks(arch, profile, False), seeding_peaks(arch, profile, True)
    chosen = {}
    for seeding in SEEDINGS:
        if profile.offload in ("always", "never"):
            off = profile.offload == "always"
        else:  # auto: offloaded when the resident peak would not fit; with no GPU in view, the least it needs
            off = free_gb is None or resident[seeding]["peak_gb"] > free_gb
        chosen[seeding] = offloaded[seeding]["peak_gb"] if off else resident[seeding]["peak_gb"]
    return {"architecture": str(root) if _has_configs(root) else profile.architecture,
            "resident": resident, "offloaded": offloaded, "peak_gb": chosen}


def resident_peak_gb(profile, root: Path | None, seeding: str) -> float | None:
    """The peak with the text encoder and VAE on the device: what `offload: auto` compares with the
    GPU's free memory. A profile's `memory_gb` means the peak as it will run, so it stands here too."""
    if seeding in profile.memory_gb:
        return profile.memory_gb[seeding]
    found = estimate(profile, root)
    return found["resident"][seeding]["peak_gb"] if found else None


def profile_peaks(profile, root: Path | None = None, free_gb: float | None = None) -> dict[str, float]:
    """Peak GB per seeding mode: the profile's `memory_gb` where it sets them, else the memory model
    (for the folder at `root`, or the profile's own, or its named architecture); {} when unknown."""
    found = estimate(profile, root if root is not None else model_folder(profile), free_gb)
    return {**(found["peak_gb"] if found else {}), **profile.memory_gb}
