"""Build small Wan-architecture models in Diffusers format, offline: the embedded default and test models.

Uses diffusers' and transformers' real classes (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel) with small configs and deterministic random weights, plus a byte-level
tokenizer made with the `tokenizers` library, so nothing is ever downloaded. The shipped default
under mmpl_cli/assets/tiny is made by `python -m mmpl_cli.tiny mmpl_cli/assets/tiny`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from mmpl_cli.memory import UMT5_XXL, WAN_TRANSFORMERS

TEXT_DIM = 32

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=64, ffn_dim=192, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Wan's own channel multipliers over a base of 8: width where the latent is small costs 10-15% per
# training step on a CPU; trained alike, its 81-frame window loss ended at 0.155, a flat 8's at 0.249.
VAE_CONFIG = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """T5-style special tokens over the 256 byte symbols: any prompt tokenizes, nothing is unknown."""
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """T5-style special tokens over a fixed vocabulary of lower-cased words (other words are <unk>)."""
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(dest: Path, seed: int = 0, num_layers: int = 2, vocabulary: list[str] | None = None) -> Path:
    """Write a complete Diffusers-format Wan folder (transformer, vae, text_encoder, tokenizer); with a
    `vocabulary`, the tokenizer is word-level over it, else byte-level."""
    dest = Path(dest)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(vocabulary) if vocabulary else byte_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, "num_layers": num_layers})
    vae = AutoencoderKLWan(**VAE_CONFIG)
    tokenizer.save_pretrained(dest / "tokenizer")
    text_encoder.save_pretrained(dest / "text_encoder", safe_serialization=True)
    transformer.save_pretrained(dest / "transformer", safe_serialization=True)
    vae.save_pretrained(dest / "vae", safe_serialization=True)
    return dest


def build_wan_model(dest: Path, arch: str, num_layers: int = 1, text_layers: int = 1, seed: int = 0) -> Path:
    """A Diffusers-format folder of a released architecture (memory.WAN_TRANSFORMERS) at its real
    width: the transformer of `arch`, UMT5-XXL's encoder and the Wan2.1 VAE (diffusers' defaults), with
    `num_layers` transformer blocks and `text_layers` encoder layers (tests cut the depth so a CPU can
    run them), random weights saved in float32. The tokenizer is byte-level (the real one's vocabulary
    of 256,384 would be most of the memory)."""
    dest = Path(dest)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, "vocab_size": len(tokenizer), "num_layers": text_layers}))
    transformer = WanTransformer3DModel(**{**WAN_TRANSFORMERS[arch], "num_layers": num_layers})
    vae = AutoencoderKLWan()
    tokenizer.save_pretrained(dest / "tokenizer")
    for module, name in ((text_encoder, "text_encoder"), (transformer, "transformer"), (vae, "vae")):
        module.save_pretrained(dest / name, safe_serialization=True)
    return dest


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "mmpl_cli/assets/tiny")))
