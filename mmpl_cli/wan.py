"""The Wan backend: text, VAE and the one engine primitive, on diffusers' Wan modules.

    denoise(noise, frames, sees, context, text) -> latents

denoises the target latents at explicit frame positions `frames`, attending to the clean
`context` latents whose frames are in `sees`, with classifier-free guidance. The clean context is
run through the model once per task (at t = 0, group by group, each group seeing what it saw when
it was generated) and its self-attention keys/values are kept in a cache that every denoising
step reuses. Everything else is diffusers' own `WanTransformer3DModel.forward`: we only add what it
lacks, installed into the loaded model:

* `ExplicitFrameRope` replaces `model.rope`: the temporal rotary angle of each latent is taken
  from its frame index in the segment instead of its position in the tensor;
* `ContextCacheAttnProcessor` replaces every self-attention processor: it appends the visible
  cached keys/values to the group's own, and can record the group's keys/values into a cache.

Outside `_active(...)` both behave exactly like diffusers' stock modules. One level for a whole
input takes diffusers' per-sample timestep path; a level per frame takes its per-token path
(`timestep` of shape [B, tokens]).

Stops at tensors: knows nothing of shot lists, files in a render folder or ffmpeg.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from transformers import AutoTokenizer, UMT5EncoderModel

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.profiles import GPU_ATTENTION, Sampler
from mmpl_cli.sampling import StepCallback, guided, make_scheduler, noise_seed, sample

TEXT_CACHE = 16  # prompt encodings a backend keeps (the negative prompt, used by every task, stays)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_dtype(dtype: torch.dtype) -> torch.dtype:
    """The text encoder's dtype for a model in `dtype`: never float16, where the T5 family's
    activations overflow (its embeddings are cast to the transformer's dtype afterwards)."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


# --------------------------------------------------------------------------------------------
# What diffusers lacks: explicit frame positions and a cache of clean context keys/values.


class ContextCache:
    """Self-attention keys/values of a task's clean context latents: one buffer per layer, for one text.

    The buffers hold every context token once, in the order the groups are recorded (each group's
    keys/values are written in place while it runs at t = 0), and are read by frame: a visible
    set that is a run of recorded frames (MMPL's always is: each group sees a prefix of what came
    before it) is a view of the buffers, any other set an index into them. Nothing is concatenated
    per step; the buffers are freed with the cache, when the task's last step is done.
    """

    def __init__(self, num_layers: int, frames: Sequence[int], tokens_per_frame: int):
        self.frames = list(frames)  # frame of every slot, in recording order
        if len(set(self.frames)) != len(self.frames):
            raise ValueError(f"context frames recorded twice: {self.frames}")
        self.tokens_per_frame = tokens_per_frame
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, slots * tokens, heads, head_dim]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.recorded = 0  # slots written so far
        self._writing: slice | None = None  # token range of the group being recorded

    def begin(self, frames: Sequence[int]) -> None:
        """The next `forward_at` records the group at `frames`: the next slots, in this order."""
        expected = self.frames[self.recorded:self.recorded + len(frames)]
        if list(frames) != expected:
            raise ValueError(f"recording frames {list(frames)}, expected {expected}")
        t = self.tokens_per_frame
        self._writing = slice(self.recorded * t, (self.recorded + len(frames)) * t)
        self.recorded += len(frames)

    def record(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self._writing is None:
            raise RuntimeError("ContextCache.record outside begin()")
        if self.keys[layer] is None:  # the first group's shapes, device and dtype size the buffers
            size = (key.shape[0], len(self.frames) * self.tokens_per_frame, *key.shape[2:])
            self.keys[layer] = key.new_empty(size)
            self.values[layer] = value.new_empty(size)
        self.keys[layer][:, self._writing] = key
        self.values[layer][:, self._writing] = value

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def visible(self, frames: Sequence[int]) -> "CacheView":
        """The cached tokens whose frame is in `frames`, in recording order (a view where it can be)."""
        wanted = set(frames)
        slots = [i for i, f in enumerate(self.frames[:self.recorded]) if f in wanted]
        if not slots:
            return CacheView(None, None)
        t = self.tokens_per_frame
        if slots == list(range(slots[0], slots[-1] + 1)):
            part = slice(slots[0] * t, (slots[-1] + 1) * t)
            return CacheView([k[:, part] for k in self.keys], [v[:, part] for v in self.values])
        index = torch.tensor([s * t + i for s in slots for i in range(t)], device=self.keys[0].device)
        return CacheView([k.index_select(1, index) for k in self.keys], [v.index_select(1, index) for v in self.values])


@dataclass
class CacheView:
    keys: list[torch.Tensor] | None  # per layer, [B, tokens, heads, head_dim]
    values: list[torch.Tensor] | None


@dataclass
class _Session:
    """What one forward call of the transformer needs beyond diffusers' arguments."""

    frames: torch.Tensor  # frame index of each latent in the input, [F]
    context: CacheView = field(default_factory=lambda: CacheView(None, None))
    record_into: ContextCache | None = None  # store this group's keys/values here
    attn_mask: torch.Tensor | None = None  # only for the recompute-everything reference path


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("mmpl_session", default=None)


@contextlib.contextmanager
def _active(session: _Session) -> Iterator[None]:
    token = _SESSION.set(session)
    try:
        yield
    finally:
        _SESSION.reset(token)


class ExplicitFrameRope(torch.nn.Module):
    """Wan's 3-D RoPE with the temporal angle taken from explicit frame indices."""

    def __init__(self, stock: torch.nn.Module):
        super().__init__()
        self.stock = stock  # diffusers' WanRotaryPosEmbed: its tables and splits are reused as they are

    def forward(self, hidden_states: torch.Tensor):
        session = _SESSION.get()
        if session is None:
            return self.stock(hidden_states)
        stock = self.stock
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = stock.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        if session.frames.numel() != ppf:
            raise ValueError(f"{session.frames.numel()} frame positions for {ppf} latent frames")
        split = [stock.t_dim, stock.h_dim, stock.w_dim]
        out = []
        for table in (stock.freqs_cos, stock.freqs_sin):
            t_tab, h_tab, w_tab = table.split(split, dim=1)
            t = t_tab[session.frames.to(t_tab.device)].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = h_tab[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = w_tab[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1))
        return out[0], out[1]


class ContextCacheAttnProcessor:
    """Self-attention that also attends to cached clean context; diffusers' processor otherwise."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int):
        self.layer = layer
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        session = _SESSION.get()
        if session is None:
            self.stock._attention_backend = self._attention_backend
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb
        query = apply_rotary_emb(query, (cos[0, :, 0], sin[0, :, 0]), use_real=True, sequence_dim=1)
        key = apply_rotary_emb(key, (cos[0, :, 0], sin[0, :, 0]), use_real=True, sequence_dim=1)
        if session.record_into is not None:
            session.record_into.record(self.layer, key, value)
        if session.context.keys is not None:
            key = torch.cat([session.context.keys[self.layer], key], dim=1)
            value = torch.cat([session.context.values[self.layer], value], dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=session.attn_mask, dropout_p=0.0,
                                    is_causal=False, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def checkpoint_blocks(transformer: WanTransformer3DModel) -> None:
    """Gradient checkpointing of the Wan blocks (diffusers' own switch), with the engine's session
    (frame positions, attention mask) active again when a block is recomputed in the backward pass:
    it is a context variable, which the backward pass would not see."""
    def checkpointed(block, *args):
        session = _SESSION.get()

        def run(*inputs):
            with _active(session):
                return block(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(checkpointed)


def install_engine_modules(transformer: WanTransformer3DModel) -> WanTransformer3DModel:
    """Put explicit-frame RoPE and the cache processor into a diffusers Wan transformer (idempotent)."""
    if not isinstance(transformer.rope, ExplicitFrameRope):
        transformer.rope = ExplicitFrameRope(transformer.rope)
    for layer, block in enumerate(transformer.blocks):
        if not isinstance(block.attn1.processor, ContextCacheAttnProcessor):
            backend = getattr(block.attn1.processor, "_attention_backend", None)
            block.attn1.set_processor(ContextCacheAttnProcessor(layer))
            block.attn1.processor._attention_backend = backend
    return transformer


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The diffusers attention backend to use: `auto` is flash-attn on a CUDA GPU in half precision
    when the `flash` extra is installed, else torch's native scaled dot-product attention."""
    from importlib.util import find_spec

    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        return "flash" if device.type == "cuda" and half and find_spec("flash_attn") is not None else "native"
    if name.startswith("flash") and not half:
        raise InputError(Problem("", None, "model.attention",
                                 f"attention backend '{name}' needs bfloat16 or float16 weights, the profile's dtype is {dtype}",
                                 "set model.dtype to bfloat16, or model.attention to native"))
    if name in GPU_ATTENTION and device.type != "cuda":
        raise InputError(Problem("", None, "model.attention",
                                 f"attention backend '{name}' needs a CUDA GPU, the device is {device}",
                                 "set model.attention to auto or native"))
    return name


def decide_offload(mode: str, device: torch.device, memory_gb: float | None) -> bool:
    """Keep the text encoder and VAE on the CPU between uses: `always`, or with `auto` on a GPU whose
    free memory (GB) is below `memory_gb`, the memory model's peak with everything resident."""
    if mode == "never" or device.type != "cuda":
        return False
    if mode == "always":
        return True
    if memory_gb is None:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return free / 1e9 < memory_gb


# --------------------------------------------------------------------------------------------
# The primitive.


@dataclass(frozen=True)
class ContextGroup:
    """Clean latents of one earlier group, and the frames that group attended to when it was made."""

    latents: torch.Tensor  # [C, F, H, W], model space
    frames: tuple[int, ...]
    sees: tuple[int, ...]


@dataclass(frozen=True)
class Text:
    """Prompt embeddings for one group: the prompt and, with guidance, the negative prompt."""

    cond: torch.Tensor  # [1, tokens, dim]
    uncond: torch.Tensor | None


class WanBackend:
    """Text encoding, VAE and `denoise` on one device; built from a Diffusers-format Wan folder.

    Its contract, what the rest of mmpl calls:

    * `text`, `encode_text`, `encode`, `decode`: prompts to embeddings, pixels to latents and back;
    * `denoise(noise, frames, sees, context, text, sampler)`: a group from noise, against clean
      context groups cached once (the render's path; `flow_at_levels` for per-latent noise levels);
    * `forward_at(x, frames, t, text)`: one transformer evaluation at explicit frame positions
      (training, tests and benchmarks);
    * `reference_evaluator(frames, sees, context, texts)`: the same group's model in one masked pass
      over context and targets, without a cache: what the cached path must equal, and what
      training runs on batches.

    The device rule: what goes in and what comes out of the backend lives on the CPU in float32
    (noise, context latents, pixels, latents, flows); everything between lives on the model's
    device, the sampler's state included, and crosses over once each way per call. `Text` is the
    backend's own handle: its embeddings stay on the device. tests/test_device.py holds every call
    to it on a stand-in device that refuses mixed-device operations as CUDA does.
    """

    def __init__(self, pipe: WanPipeline, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = 512, offload: bool = False, attention: str = "native"):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.offload = offload  # text encoder and VAE wait on the CPU and visit the device to run
        self.attention = attention
        self.loaded: list[str] = []  # what was loaded, for the log
        self.transformer = install_engine_modules(pipe.transformer)
        self.call = self.transformer  # what forward_at calls: the transformer, or training's data-parallel wrapper of it
        self.vae = pipe.vae
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # the latest TEXT_CACHE prompts
        if self.vae is None:  # training from prepared latents: no VAE loaded
            return
        z = self.vae.config.z_dim
        self._latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(z, 1, 1, 1)
        self._latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(z, 1, 1, 1)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, root: Path, device: str = "cpu", dtype: str = "float32", max_sequence_length: int = 512,
                    checkpoint: Path | None = None, checkpoint_key: str = "auto", checkpoint_naming: str = "auto",
                    attention: str = "auto", offload: str = "never", memory_gb: float | None = None,
                    transformer_only: bool = False) -> "WanBackend":
        """Load a Diffusers-format folder offline (no hub access, safetensors only, no pickles),
        optionally with a transformer checkpoint over the folder's transformer weights (weights.py);
        `transformer_only` for training on prepared latents and text (no VAE, no text encoder)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch_dtype = DTYPES[dtype]
        root = Path(root)
        try:
            transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype,
                                                                use_safetensors=True)
            vae = text_encoder = tokenizer = None
            if not transformer_only:
                vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32, use_safetensors=True)
                text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=text_dtype(torch_dtype),
                                                                use_safetensors=True)
                tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        except (OSError, ValueError) as exc:
            raise InputError(Problem(str(root), None, "model.path", f"cannot load the Wan model: {exc}")) from None
        loaded = [f"{root} ({dtype})"]
        if checkpoint is not None:
            from mmpl_cli.weights import check_against, read_transformer_checkpoint

            state, what = read_transformer_checkpoint(checkpoint, checkpoint_key, checkpoint_naming)
            check_against(checkpoint, state, {k: v.shape for k, v in transformer.state_dict().items()})
            transformer.load_state_dict(state, strict=True)
            del state
            loaded.append(f"transformer from {what}")
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                           scheduler=make_scheduler(Sampler(steps=1)))
        device = torch.device(device)
        move_off = decide_offload(offload, device, memory_gb)
        for module in (transformer, vae, text_encoder):
            if module is not None:
                module.eval().requires_grad_(False)
        transformer.to(device)
        if not move_off and not transformer_only:
            vae.to(device)
            text_encoder.to(device)
        backend_name = resolve_attention(attention, device, torch_dtype)
        install_engine_modules(transformer)
        if backend_name != "native":
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "experimental feature" warning
            try:
                transformer.set_attention_backend(backend_name)
            finally:
                diffusers_logging.set_verbosity(level)
        loaded.append(f"attention {backend_name}")
        if move_off:
            loaded.append("text encoder and VAE offloaded to the CPU between uses")
        backend = cls(pipe, device=device, dtype=torch_dtype, max_sequence_length=max_sequence_length,
                      offload=move_off, attention=backend_name)
        backend.loaded = loaded
        return backend

    @contextlib.contextmanager
    def _visiting(self, module: torch.nn.Module) -> Iterator[None]:
        """With offloading, `module` comes to the device for the call and goes back to the CPU after."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- text ------------------------------------------------------------------------------

    def prompt_embeds(self, prompt: str | list[str]) -> torch.Tensor:
        """Prompt embeddings [B, tokens, dim] as diffusers' Wan pipeline makes them, one row per prompt
        (with gradients, for training)."""
        embeds, _ = self.pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length,
                                            device=self.device, dtype=self.dtype)
        return embeds

    def encode_text(self, prompt: str) -> torch.Tensor:
        """`prompt_embeds` without gradients; a prompt is encoded once while it is among the latest
        TEXT_CACHE used (a batch of a thousand prompts does not keep a thousand encodings)."""
        if prompt not in self._text_cache:
            with torch.no_grad(), self._visiting(self.pipe.text_encoder):
                self._text_cache[prompt] = self.prompt_embeds(prompt)
            while len(self._text_cache) > TEXT_CACHE:
                self._text_cache.popitem(last=False)
        self._text_cache.move_to_end(prompt)
        return self._text_cache[prompt]

    def text(self, prompt: str, negative_prompt: str, guidance: float) -> Text:
        return Text(self.encode_text(prompt), self.encode_text(negative_prompt) if guidance != 1.0 else None)

    # -- VAE -------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents [C, F, H, W] -> pixels [3, 1 + 4(F-1), H*8, W*8] in [-1, 1]."""
        x = latents.float().cpu() * self._latents_std + self._latents_mean
        x = x.unsqueeze(0).to(self.device, self.vae.dtype)
        with self._visiting(self.vae):
            return self.vae.decode(x, return_dict=False)[0][0].float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [3, F, H, W] in [-1, 1] -> model-space latents [C, 1 + (F-1)/4, H/8, W/8] (posterior mode);
        a batch [B, 3, F, H, W] -> [B, C, ...] (training encodes its clip pool so, about twice as fast)."""
        x = (pixels if pixels.dim() == 5 else pixels[None]).to(self.device, self.vae.dtype)
        with self._visiting(self.vae):
            z = self.vae.encode(x).latent_dist.mode().float().cpu()
        z = (z - self._latents_mean) / self._latents_std
        return z if pixels.dim() == 5 else z[0]

    # -- the primitive ---------------------------------------------------------------------

    def forward_at(self, x: torch.Tensor, frames: Sequence[int], t: torch.Tensor | float, text: torch.Tensor,
                 context: CacheView | None = None, record_into: ContextCache | None = None,
                 attn_mask: torch.Tensor | None = None, frame_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer evaluation of latents x [C, F, H, W] at frame positions `frames` (or of a
        batch x [B, C, F, H, W] with text [B, tokens, dim] and frame_timesteps [F] or [B, F], as
        training runs it)."""
        model = self.transformer
        batch = x if x.dim() == 5 else x[None]
        num_frames, height, width = x.shape[-3:]
        p_t, p_h, p_w = model.config.patch_size
        tokens_per_frame = (height // p_h) * (width // p_w)
        if frame_timesteps is None:
            # One level for the whole input: diffusers' per-sample path, which builds the [6, dim]
            # modulation once instead of once per token (1.3 GB per block for 14B's planning group).
            # A tensor `t` stays a tensor: no sync with the device.
            timestep = torch.as_tensor(t, dtype=torch.float32).reshape(1).to(self.device).expand(len(batch))
        else:  # a level per frame: diffusers' per-token path
            timestep = frame_timesteps.to(self.device, torch.float32).repeat_interleave(tokens_per_frame, dim=-1)
            timestep = (timestep if timestep.dim() == 2 else timestep[None]).expand(len(batch), -1)
        session = _Session(frames=torch.tensor(list(frames), dtype=torch.long),
                           context=context or CacheView(None, None), record_into=record_into, attn_mask=attn_mask)
        if record_into is not None:
            record_into.begin(frames)
        with _active(session):
            out = self.call(hidden_states=batch.to(self.device, self.dtype), timestep=timestep,
                        encoder_hidden_states=text, return_dict=False)[0]
        return (out if x.dim() == 5 else out[0]).float()

    def build_cache(self, context: Sequence[ContextGroup], text: torch.Tensor, extra: Sequence[int] = (),
                    size: Sequence[int] | None = None) -> ContextCache:
        """Run the clean context once (t = 0), group by group, recording self-attention keys/values
        (with room for the `extra` frames of latents `size` [H, W] that a rollout records later)."""
        p_h, p_w = self.transformer.config.patch_size[1:]
        h, w = size or (context[0].latents.shape[-2:] if context else (0, 0))
        tokens = (h // p_h) * (w // p_w)
        cache = ContextCache(len(self.transformer.blocks), [f for g in context for f in g.frames] + list(extra), tokens)
        for group in context:
            self.forward_at(group.latents, group.frames, 0.0, text, context=cache.visible(group.sees), record_into=cache)
        return cache

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, frames: Sequence[int], sees: Sequence[int],
                context: Sequence[ContextGroup], text: Text, sampler: Sampler,
                callback: StepCallback | None = None, recompute_context: bool = False,
                stop_after: int | None = None) -> torch.Tensor:
        """Denoise `noise` [C, F, H, W] at `frames`, attending to the context frames in `sees`
        (only the first `stop_after` steps, if given: the noise search's look ahead).

        With `recompute_context` the context is not cached but run again inside every forward pass
        (one sequence, block visibility by attention mask): the slow reference the cache must equal.
        """
        # 1. Check inputs
        if noise.shape[1] != len(frames):
            raise ValueError(f"{noise.shape[1]} noise latents for {len(frames)} frames")
        # 2. Prepare the context: one cache per text, cond and uncond see different text
        texts = [text.cond] + ([text.uncond] if text.uncond is not None and sampler.guidance != 1.0 else [])
        if recompute_context:
            evaluate = self.reference_evaluator(frames, sees, context, texts)
        else:  # one cache per text, each holding its tokens once; the views below are slices of them
            views = [self.build_cache(context, emb).visible(sees) for emb in texts]

            def evaluate(x: torch.Tensor, t: torch.Tensor, which: int) -> torch.Tensor:
                return self.forward_at(x, frames, t, texts[which], context=views[which])

        # 3. Denoise
        return self._sample(noise, evaluate, len(texts), sampler, callback, stop_after)

    def _sample(self, noise: torch.Tensor, evaluate, texts: int, sampler: Sampler,
                callback: StepCallback | None, stop_after: int | None = None) -> torch.Tensor:
        """The sampler's loop from `noise`, the model being evaluate(x, t, text index), guided."""
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond = evaluate(x, t, 0)
            uncond = evaluate(x, t, 1) if texts > 1 else None
            return guided(cond, uncond, sampler.guidance)

        x = noise.to(self.device, torch.float32, copy=True)  # the sampler's state lives on the model's device
        seed = noise_seed(noise) if sampler.scheduler == "few-step" else 0
        return sample(model_fn, x, make_scheduler(sampler, seed=seed), callback, stop_after).float().cpu()

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, blocks: Sequence[Sequence[int]], context: Sequence[ContextGroup],
                text: Text, sampler: Sampler, callback: StepCallback | None = None,
                recompute_context: bool = False) -> torch.Tensor:
        """Self-Forcing's causal rollout: `blocks` of frames denoised in order from `noise` [C, F, H, W]
        (F = all blocks' frames), each seeing the clean context and every clean block before it; a
        finished block runs once more at t = 0, recording its keys/values into one cache per text,
        which the later blocks read. With `recompute_context`, no cache: every block's pass holds all
        that it sees under the block mask (the reference the cache must equal)."""
        texts = [text.cond] + ([text.uncond] if text.uncond is not None and sampler.guidance != 1.0 else [])
        earlier = [f for g in context for f in g.frames]
        groups, made, start = list(context), [], 0
        caches = [] if recompute_context else [self.build_cache(context, emb, [f for b in blocks for f in b], noise.shape[-2:])
                                               for emb in texts]
        for done, frames in enumerate(blocks, 1):
            part = noise[:, start:start + len(frames)]
            start += len(frames)
            if recompute_context:
                evaluate = self.reference_evaluator(frames, earlier, groups, texts)
            else:
                views = [cache.visible(earlier) for cache in caches]

                def evaluate(x, t, which, frames=frames, views=views):
                    return self.forward_at(x, frames, t, texts[which], context=views[which])

            clean = self._sample(part, evaluate, len(texts), sampler, None)
            for cache, emb in zip(caches if done < len(blocks) else [], texts):  # the clean block, once, into the cache
                self.forward_at(clean, frames, 0.0, emb, context=cache.visible(earlier), record_into=cache)
            groups.append(ContextGroup(clean, tuple(frames), tuple(earlier)))
            earlier = earlier + list(frames)
            made.append(clean)
            if callback is not None:
                callback(done, len(blocks))
        return torch.cat(made, dim=1)

    @torch.no_grad()
    def flow_at_levels(self, x: torch.Tensor, timesteps: torch.Tensor, text: Text, guidance: float) -> torch.Tensor:
        """The guided flow prediction for a window x [C, F, H, W] at frame positions 0 .. F-1 whose frames
        each sit at their own timestep (`timesteps` [F]), every frame seeing every other: one round of
        progressive denoising."""
        texts = [text.cond] + ([text.uncond] if text.uncond is not None and guidance != 1.0 else [])
        flows = [self.forward_at(x, range(x.shape[1]), 0.0, emb, frame_timesteps=timesteps) for emb in texts]
        return guided(flows[0], flows[1] if len(flows) > 1 else None, guidance).cpu()

    def reference_evaluator(self, frames, sees, context, texts):
        """Reference path: [context groups..., targets] in one pass, visibility by attention mask (training
        also passes batches: context latents and x [B, C, F, H, W], texts [B, tokens, dim])."""
        groups = [(tuple(g.frames), set(g.sees)) for g in context] + [(tuple(frames), set(sees))]
        owner = [(gi, f) for gi, (g_frames, _) in enumerate(groups) for f in g_frames]
        allowed = torch.tensor([[gi == gj or (gj < gi and fj in groups[gi][1]) for gj, fj in owner]
                                for gi, _ in owner])
        all_frames = [f for _, f in owner]
        clean = [g.latents.to(self.device, torch.float32) for g in context]
        context_steps = torch.zeros(len(all_frames) - len(frames))
        p_h, p_w = self.transformer.config.patch_size[1:]

        def evaluate(x: torch.Tensor, t: torch.Tensor, which: int) -> torch.Tensor:  # x [(B,) C, F, H, W]
            per_frame = (x.shape[-2] // p_h) * (x.shape[-1] // p_w)
            mask = allowed.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)[None, None]
            t = torch.as_tensor(t, dtype=torch.float32)  # one level, or one per batch sample
            steps = torch.cat([context_steps.expand(*t.shape, -1), t[..., None].expand(*t.shape, len(frames))], dim=-1)
            out = self.forward_at(torch.cat([*clean, x.to(self.device, torch.float32)], dim=-3), all_frames, t, texts[which],
                                attn_mask=mask.to(self.device), frame_timesteps=steps)
            return out[..., -len(frames):, :, :]

        return evaluate
