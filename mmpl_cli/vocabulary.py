"""Which words of a prompt the model's tokenizer cannot read: a word-level tokenizer (the trained
tiny default's) reads every word outside its vocabulary as <unk>, so a prompt can silently lose the
words that matter most to its author. Light on purpose: every worker checks its shots' prompts
before its first task, with the `tokenizers` library that transformers' fast tokenizers run on
(importing transformers itself costs a worker more than a second).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from mmpl_cli.files import load_json

MAX_CONFIG_BYTES = 1 << 20


def unknown_words(tokenizer: Tokenizer, unk_id: int | None, text: str) -> list[str]:
    """The words of `text` that `tokenizer` can only read as its unknown token `unk_id` (in order,
    once each), as transformers' fast tokenizer reads it without special tokens."""
    if unk_id is None or not text:
        return []
    encoded = tokenizer.encode(text, add_special_tokens=False)
    words = [text[a:b] for i, (a, b) in zip(encoded.ids, encoded.offsets) if i == unk_id and b > a]
    return list(dict.fromkeys(words))


def _unk_token(folder: Path) -> str | None:
    """The unknown token a model folder's tokenizer names (tokenizer_config.json, then
    special_tokens_map.json, as transformers reads them)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            config = load_json(folder / name, MAX_CONFIG_BYTES)
        except (OSError, ValueError):
            continue
        unk = config.get("unk_token") if isinstance(config, dict) else None
        unk = unk.get("content") if isinstance(unk, dict) else unk
        if isinstance(unk, str):
            return unk
    return None


def unknown_prompt_words(root: Path, prompts: dict[str, list[str]]) -> dict[str, list[str]]:
    """{shot id: words its prompts have that the model folder's tokenizer does not know}, for shots
    that have any; {} when the folder has no fast tokenizer (tokenizer.json) or it cannot be read
    (loading the model reports that)."""
    folder = Path(root) / "tokenizer"
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - missing or not a tokenizer: no check, the model load says why
        return {}
    unk = _unk_token(folder)
    unk_id = tokenizer.token_to_id(unk) if unk is not None else None
    found = {shot: list(dict.fromkeys(w for text in texts for w in unknown_words(tokenizer, unk_id, text)))
             for shot, texts in prompts.items()}
    return {shot: words for shot, words in found.items() if words}
