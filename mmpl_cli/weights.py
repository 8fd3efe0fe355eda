"""Transformer checkpoints from training code (MMPL, Self-Forcing, CausVid): read without running
pickled code, renamed to diffusers' layout by diffusers' own converter, checked against the model.

The training repositories save `torch.save({"generator": sd, "generator_ema": sd, ...})` where `sd`
is their `WanDiffusionWrapper`'s state dict: the original Wan naming under a `model.` prefix
(`model.blocks.0.self_attn.q.weight`), sometimes with FSDP / torch.compile wrapper names inside.
A `.safetensors` file holds one flat state dict in either naming.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mmpl_cli.errors import InputError, Problem

# tried in this order by key "auto": MMPL's released inference scripts load 'generator' (its EMA
# only when asked), so a file holding both renders what the published videos were rendered with
ENTRY_KEYS = ("generator", "generator_ema", "state_dict", "model")
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
SHOWN = 5  # keys listed per kind of mismatch


def _problem(path: Path, message: str, hint: str = "") -> InputError:
    return InputError(Problem(str(path), None, "model.transformer", message, hint))


def _read(path: Path, shapes_only: bool = False):
    """The file's contents; with `shapes_only`, a safetensors file gives meta tensors from its header
    (names and shapes, no data read). A .pt is memory-mapped either way."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if not shapes_only:
                return load_file(path)
            with safe_open(path, framework="pt") as fh:
                return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
        except (SafetensorError, OSError) as exc:
            raise _problem(path, f"cannot read the safetensors file: {exc}") from None
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        found = str(exc).split("Unsupported global:")[-1].split("\n")[0].strip() if "Unsupported global" in str(exc) else ""
        raise _problem(path, "refused: the file holds pickled Python objects" + (f" ({found})" if found else "")
                       + ", and loading those could run code; only tensors and plain containers are read "
                       "(torch.load with weights_only=True)",
                       "save just the state dicts: torch.save({'generator': model.state_dict()}, path), "
                       "or convert the file to .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _problem(path, f"cannot read the checkpoint: {exc}") from None


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _select(path: Path, raw, key: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside the file, and a word on which entry it was."""
    if not isinstance(raw, dict):
        raise _problem(path, f"expected a dict of tensors or of state dicts, found {type(raw).__name__}")
    held = [k for k, v in raw.items() if _is_state_dict(v)]  # the entries that hold a state dict
    if key != "auto":
        if key in raw and _is_state_dict(raw[key]):
            return raw[key], f"entry '{key}'"
        prefixed = {k[len(key) + 1:]: v for k, v in raw.items() if k.startswith(key + ".")}
        if _is_state_dict(raw) and prefixed:  # a flat file with the entry as a key prefix
            return prefixed, f"keys under '{key}.'"
        raise _problem(path, f"no state dict under '{key}'",
                       f"entries that hold one: {', '.join(held)}" if held
                       else "the file is one flat state dict: use key: auto")
    for name in ENTRY_KEYS:
        if _is_state_dict(raw.get(name)):
            others = [k for k in held if k != name]
            return raw[name], f"entry '{name}'" + (f" (the file also holds {', '.join(others)}; "
                                                   "model.transformer.key picks another)" if others else "")
    if _is_state_dict(raw):
        return raw, "the whole file"
    if len(held) == 1:
        return raw[held[0]], f"entry '{held[0]}'"
    raise _problem(path, "cannot tell which entry holds the transformer"
                   + (f": it has {', '.join(held)}" if held else ": no entry holds tensors only"),
                   "set model.transformer.key in the profile")


def entry_identity(key: str) -> str:
    """What a checkpoint's key contributes to the model fingerprint: "auto" with the order it tries,
    so that a file holding several entries, rendered when auto preferred another, is computed again."""
    return key if key != "auto" else "auto:" + ",".join(ENTRY_KEYS)


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper names (FSDP, activation checkpointing, torch.compile, DDP) and the training wrapper's `model.`."""
    out = {}
    for k, v in state.items():
        for name in WRAPPER_NAMES:
            k = k.replace(name, "")
        out[k] = v
    stripped = True
    while stripped:  # e.g. DDP's module. around the training wrapper's model.
        stripped = False
        for prefix in ("module.", "model.diffusion_model.", "model."):
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                stripped = True
    return out


def naming_of(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(".self_attn." in k or k.startswith("head.head") for k in keys):
        return "original"
    if any(".attn1." in k or k.startswith("proj_out") for k in keys):
        return "diffusers"
    return "unknown"


def read_transformer_checkpoint(path: Path, key: str = "auto", naming: str = "auto",
                                shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The transformer state dict in diffusers' naming, and a line saying what was read."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    state, entry = _select(path, _read(path, shapes_only), key)
    state = _strip(state)
    found = naming_of(state)
    if naming == "auto":
        if found == "unknown":
            raise _problem(path, f"cannot tell the naming of {entry}: neither Wan's original keys "
                                 "(blocks.N.self_attn...) nor diffusers' (blocks.N.attn1...)",
                           "is this a Wan transformer? set model.transformer.key or naming")
        naming = found
    if naming == "original":
        state = convert_wan_transformer_to_diffusers(dict(state))
    return state, f"{path.name}: {entry}, {naming} naming, {len(state)} tensors"


def check_against(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Every parameter of the model present with its shape, and nothing else; else a clear error."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys, show in (("missing", missing, str), ("unexpected", unexpected, str),
                              ("with another shape", wrong,
                               lambda k: f"{k} {tuple(state[k].shape)} != model {tuple(expected[k])}")):
        if keys:
            listed = "; ".join(show(k) for k in keys[:SHOWN]) + (f"; ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")
            parts.append(f"{len(keys)} {label}: {listed}")
    raise _problem(path, "the checkpoint does not fit the model folder's transformer: " + " | ".join(parts),
                   "check that the checkpoint and model.path are the same architecture (1.3B or 14B), "
                   "and model.transformer.key / naming")


def expected_shapes(transformer_dir: Path) -> dict[str, torch.Size]:
    """Parameter names and shapes of the folder's transformer, from its config alone (no weights read)."""
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(transformer_dir)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def verify_checkpoint(model_root: Path, path: Path, key: str = "auto", naming: str = "auto") -> str:
    """Check a checkpoint's names and shapes before anything is written (a .pt memory-mapped, a
    .safetensors by its header only); returns what was read."""
    state, what = read_transformer_checkpoint(path, key, naming, shapes_only=True)
    check_against(path, state, expected_shapes(Path(model_root) / "transformer"))
    return what
