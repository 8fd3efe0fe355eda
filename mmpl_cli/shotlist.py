"""Shot list v1: YAML -> validated, typed shots. Knows nothing of torch, models or the render folder.

    version: 1
    defaults: {profile: tiny, seed: 0, negative_prompt: "", steps: 8, guidance: 5.0}
    shots:
      - id: harbour                 # letters, digits, '-', '_'; names the output file
        duration: 12.5              # seconds
        prompts:                    # or a single `prompt: ...`
          - {at: 0, prompt: "a quiet harbour at dawn"}
          - {at: 6, prompt: "the harbour at noon, boats leaving"}

Every problem in the file is collected and reported together, each with file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.profiles import SAMPLER_KEYS, sampler_overrides
from mmpl_cli.terms import STRATEGIES
from mmpl_cli.yamlio import Fields, Located, load_yaml

SHOT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")
DEFAULT_KEYS = {"profile", "seed", "negative_prompt", "strategy"} | SAMPLER_KEYS
SHOT_KEYS = {"id", "prompt", "prompts", "duration", "seed", "negative_prompt", "init_image", "strategy"} | SAMPLER_KEYS
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PromptChange:
    at: float  # seconds from the start of the shot
    prompt: str


@dataclass(frozen=True)
class Shot:
    id: str
    prompts: tuple[PromptChange, ...]  # first one at 0 s; in order
    duration: float  # seconds
    seed: int
    negative_prompt: str | None  # None: the profile's (plan_shot resolves it)
    init_image: Path | None
    strategy: str | None  # None: the profile's (mmpl unless it names another)
    sampler_overrides: dict  # steps / guidance / shift / scheduler given for this shot or in defaults
    line: int  # where the shot starts in the file

    def prompt_at(self, seconds: float) -> str:
        """The prompt in force at `seconds` from the start of the shot."""
        current = self.prompts[0].prompt
        for change in self.prompts:
            if change.at <= seconds + 1e-9:
                current = change.prompt
        return current


@dataclass(frozen=True)
class ShotList:
    path: Path
    profile: str
    shots: tuple[Shot, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def load_shot_list(path: Path) -> ShotList:
    """Read and validate a shot list; raises InputError listing every problem found."""
    path = Path(path)
    data = load_yaml(path, "shot list")
    problems: list[Problem] = []
    shot_list = parse_shot_list(data, path, problems)
    if problems:
        raise InputError(problems)
    assert shot_list is not None
    return shot_list


def parse_shot_list(data, path: Path, problems: list[Problem]) -> ShotList | None:
    f = Fields(str(path), problems)
    root = f.mapping(data, getattr(data, "line", 1), "")
    if root is None:
        return None
    f.unknown_keys(root, {"version", "defaults", "shots"}, "")
    version = root.get("version")
    if version is None:
        f.add(root.line, "version", "missing required field 'version'", "add 'version: 1' at the top")
    elif version != 1 or isinstance(version, bool):
        f.add(f.line_of(root, "version"), "version", f"unsupported shot list version {version!r}; this mmpl reads version 1")

    defaults = f.get(root, "defaults", "", "mapping") or Located(line=root.line)
    f.unknown_keys(defaults, DEFAULT_KEYS, "defaults")
    profile = f.get(defaults, "profile", "defaults", "str", default="tiny")
    default_seed = f.get(defaults, "seed", "defaults", "int", default=0, minimum=0, maximum=MAX_SEED)
    default_negative = f.get(defaults, "negative_prompt", "defaults", "str")  # None: the profile's
    default_strategy = f.get(defaults, "strategy", "defaults", "str", choices=list(STRATEGIES))  # None: the profile's
    default_sampler = sampler_overrides(f, defaults, "defaults")

    shots_raw = f.get(root, "shots", "", "list", required=True, default=[])
    if "shots" in root and isinstance(root["shots"], list) and not root["shots"]:
        f.add(f.line_of(root, "shots"), "shots", "expected at least one shot, found an empty list")
    shots: list[Shot] = []
    seen: dict[str, int] = {}
    item_lines = getattr(shots_raw, "item_lines", [root.line] * len(shots_raw))
    for i, raw in enumerate(shots_raw):
        prefix = f"shots[{i}]"
        m = f.mapping(raw, item_lines[i], prefix)
        if m is None:
            continue
        shot = _parse_shot(f, m, prefix, path, default_seed, default_negative, default_strategy, default_sampler)
        if shot is None:
            continue
        if shot.id in seen:
            f.add(f.line_of(m, "id"), f"{prefix}.id",
                  f"duplicate shot id '{shot.id}' (first used on line {seen[shot.id]})", "shot ids name output files")
            continue
        seen[shot.id] = f.line_of(m, "id") or m.line
        shots.append(shot)
    return ShotList(path=path, profile=profile, shots=tuple(shots))


def _parse_shot(f: Fields, m: Located, prefix: str, path: Path, default_seed: int, default_negative: str,
                default_strategy: str, default_sampler: dict) -> Shot | None:
    before = len(f.problems)
    f.unknown_keys(m, SHOT_KEYS, prefix)
    shot_id = f.get(m, "id", prefix, "str", required=True)
    if shot_id is not None and not SHOT_ID.fullmatch(shot_id):
        f.add(f.line_of(m, "id"), f"{prefix}.id",
              f"expected letters, digits, '-' and '_' (at most 100, not starting with '-'), found '{shot_id}'",
              "the id names the output file, so it may not contain '/', '.', spaces or other characters")
    duration = f.get(m, "duration", prefix, "float", required=True, exclusive_minimum=0.0, maximum=24 * 3600)
    seed = f.get(m, "seed", prefix, "int", default=default_seed, minimum=0, maximum=MAX_SEED)
    negative = f.get(m, "negative_prompt", prefix, "str", default=default_negative)
    strategy = f.get(m, "strategy", prefix, "str", default=default_strategy, choices=list(STRATEGIES))
    sampler = {**default_sampler, **sampler_overrides(f, m, prefix)}

    prompts: list[PromptChange] = []
    if "prompt" in m and "prompts" in m:
        f.add(f.line_of(m, "prompts"), prefix, "expected either 'prompt' or 'prompts', found both")
    elif "prompts" in m:
        prompts = _parse_schedule(f, m, prefix, duration)
    else:
        text = f.get(m, "prompt", prefix, "str", required=True)
        if text is not None:
            if not text.strip():
                f.add(f.line_of(m, "prompt"), f"{prefix}.prompt", "expected a prompt, found empty text")
            prompts = [PromptChange(0.0, text)]

    init_image = None
    raw_image = f.get(m, "init_image", prefix, "str")
    if raw_image is not None:
        init_image = Path(raw_image).expanduser()
        if not init_image.is_absolute():
            init_image = path.parent / init_image
        if not init_image.exists():
            f.add(f.line_of(m, "init_image"), f"{prefix}.init_image", f"image not found: {init_image}")
        elif not init_image.is_file():  # a folder, a FIFO or a device: a reader could block on it
            f.add(f.line_of(m, "init_image"), f"{prefix}.init_image", f"expected an image file, found something "
                                                                       f"that is not a plain file: {init_image}")

    if len(f.problems) > before or shot_id is None or duration is None or not prompts:
        return None
    return Shot(id=shot_id, prompts=tuple(prompts), duration=duration, seed=seed, negative_prompt=negative,
                init_image=init_image, strategy=strategy, sampler_overrides=sampler, line=m.line)


def _parse_schedule(f: Fields, m: Located, prefix: str, duration: float | None) -> list[PromptChange]:
    raw = f.get(m, "prompts", prefix, "list", required=True, default=[])
    field = f"{prefix}.prompts"
    if not raw:
        f.add(f.line_of(m, "prompts"), field, "expected at least one {at, prompt} entry, found none")
        return []
    lines = getattr(raw, "item_lines", [m.line] * len(raw))
    out: list[PromptChange] = []
    for j, item in enumerate(raw):
        item_prefix = f"{field}[{j}]"
        entry = f.mapping(item, lines[j], item_prefix)
        if entry is None:
            continue
        f.unknown_keys(entry, {"at", "prompt"}, item_prefix)
        at = f.get(entry, "at", item_prefix, "float", required=True, minimum=0.0)
        text = f.get(entry, "prompt", item_prefix, "str", required=True)
        if at is None or text is None:
            continue
        line = f.line_of(entry, "at")
        if j == 0 and at != 0:
            f.add(line, f"{item_prefix}.at", f"expected the first prompt at 0 seconds, found {at:g}")
        if out and at <= out[-1].at:
            f.add(line, f"{item_prefix}.at", f"expected times in increasing order, found {at:g} after {out[-1].at:g}")
        if duration is not None and at >= duration and j > 0:
            f.add(line, f"{item_prefix}.at", f"expected a time inside the shot (< {duration:g} s), found {at:g}")
        if not text.strip():
            f.add(f.line_of(entry, "prompt"), f"{item_prefix}.prompt", "expected a prompt, found empty text")
        out.append(PromptChange(at, text))
    return out
