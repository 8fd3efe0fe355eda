"""A render request and its validation: everything that can be wrong with the input is found here,
before any file is written and before torch is imported (so bad input fails fast).
"""

from __future__ import annotations

import dataclasses
import json

from dataclasses import dataclass
from pathlib import Path


from mmpl_cli.claims import owner_decision, shot_list_identity
from mmpl_cli.errors import InputError, Problem
from mmpl_cli.files import check_output, open_image
from mmpl_cli.plan import ShotPlan, plan_shot_list
from mmpl_cli.profiles import GPU_ATTENTION, Profile, load_profile
from mmpl_cli.shotlist import ShotList, load_shot_list
from mmpl_cli.terms import Seeding
from mmpl_cli.store import RenderStore


@dataclass(frozen=True)
class RenderRequest:
    shots: Path
    out: Path | None = None  # default: renders/<shot list name>/
    profile: str | None = None  # overrides the shot list's defaults.profile
    seeding: str = "auto"  # auto | terminal | midpoint
    model_path: str | None = None  # overrides the profile's model folder
    device: str = "auto"
    restart: bool = False  # forget finished tasks and start over
    storyboard: bool = False  # write <out>/<shot>.storyboard.png once a shot's planning is done
    strategy: str | None = None  # overrides every shot's strategy

    def out_dir(self, shot_list_name: str) -> Path:
        return self.out or Path("renders") / shot_list_name

    def render_args(self) -> list[str]:
        """The arguments of `mmpl render` that ask for this render (without --restart)."""
        words = [str(self.shots)]
        if self.out is not None:
            words += ["--out", str(self.out)]
        for flag, value in (("--profile", self.profile), ("--model-path", self.model_path)):
            if value is not None:
                words += [flag, value]
        if self.seeding != "auto":
            words += ["--seeding", self.seeding]
        if self.device != "auto":
            words += ["--device", self.device]
        if self.strategy is not None:
            words += ["--strategy", self.strategy]
        if self.storyboard:
            words += ["--storyboard"]
        return words

    def resume_command(self) -> str:
        """The command that picks this render up where it stopped."""
        import shlex

        return shlex.join(["mmpl", "render", *self.render_args()])


def prepare(request: RenderRequest) -> tuple[ShotList, Profile, list[ShotPlan]]:
    """Read, validate and plan the shot list and profile (no weights, no files written)."""
    shot_list = load_shot_list(request.shots)
    if request.strategy is not None:
        shot_list = dataclasses.replace(shot_list, shots=tuple(dataclasses.replace(shot, strategy=request.strategy)
                                                               for shot in shot_list.shots))
    profile_name = request.profile or shot_list.profile
    try:
        profile = load_profile(profile_name, relative_to=request.shots.parent)
    except InputError as exc:
        if request.profile is None:  # it came from the shot list: point at it
            exc = InputError([Problem(str(request.shots), None, "defaults.profile", p.message, p.hint)
                              if not p.file else p for p in exc.problems])
        raise exc from None
    # 'auto' is settled on the device (free memory); both modes validate alike, so plan terminal here
    plans = plan_shot_list(shot_list, profile, Seeding.TERMINAL if request.seeding == "auto" else request.seeding)
    return shot_list, profile, plans


def check_weights(profile, model_path: str | None) -> Path:
    root = profile.resolve_model_path(model_path)
    missing = profile.missing_model_files(model_path)
    if missing:
        how = "pass --model-path DIR"
        if profile.model_path_env:
            how += f" or set {profile.model_path_env}"
        if missing == [str(root)]:
            message = f"model folder not found: {root}"
        else:
            message = f"model folder {root} lacks: {', '.join(missing)}"
        raise InputError(Problem(profile.source, None, "model.path", message,
                                 f"expected a Diffusers-format Wan folder; {how}"))
    checkpoint = profile.resolve_checkpoint()
    if checkpoint is not None and not checkpoint.is_file():
        how = f"set {profile.checkpoint.path_env} or " if profile.checkpoint.path_env else ""
        raise InputError(Problem(profile.source, profile.checkpoint.line, "model.transformer.path",
                                 f"transformer checkpoint not found: {checkpoint}",
                                 f"{how}fix the path (relative paths start at the profile's folder)"))
    return root


def check_attention(profile: Profile, device: str) -> None:
    """An attention backend the profile names must be installed and have a GPU (checked before torch)."""
    from importlib.util import find_spec

    name = profile.attention
    if name not in GPU_ATTENTION:
        return
    package = GPU_ATTENTION[name]
    if package is not None and find_spec(package) is None:
        extra = " (pip install 'mmpl-cli[flash]')" if package == "flash_attn" else ""
        raise InputError(Problem(profile.source, None, "model.attention",
                                 f"attention backend '{name}' needs the package {package}, which is not installed{extra}",
                                 "or set model.attention to auto or native"))
    if device == "cpu":
        raise InputError(Problem(profile.source, None, "model.attention",
                                 f"attention backend '{name}' runs only on a CUDA GPU, and --device is cpu",
                                 "set model.attention to auto or native"))


def image_digests(shot_list) -> dict[str, str]:
    """Content hash of every init image, reading each fully (an unreadable image fails here, early)."""
    from mmpl_cli.files import sha256_file

    out, problems = {}, []
    for shot in shot_list.shots:
        if shot.init_image is None:
            continue
        try:
            with open_image(shot.init_image) as img:
                img.load()
            out[shot.id] = sha256_file(shot.init_image)
        except InputError as exc:
            problems.extend(Problem(str(shot_list.path), shot.line, f"{shot.id}.init_image",
                                    f"{shot.init_image}: {p.message}") for p in exc.problems)
        except OSError as exc:  # truncated or corrupt image data, found while decoding
            problems.append(Problem(str(shot_list.path), shot.line, f"{shot.id}.init_image",
                                    f"cannot read the image {shot.init_image}: {exc}"))
    if problems:
        raise InputError(problems)
    return out


@dataclass(frozen=True)
class Checked:
    """A request whose every input has been validated: safe to start writing."""

    request: RenderRequest
    shot_list: ShotList
    profile: Profile
    plans: list[ShotPlan]
    model_root: Path
    image_digests: dict[str, str]
    out: Path


def check(request: RenderRequest) -> Checked:
    """Validate everything a render needs; raises InputError (exit code 2) and writes nothing."""
    shot_list, profile, plans = prepare(request)
    model_root = check_weights(profile, request.model_path)
    check_attention(profile, request.device)
    digests = image_digests(shot_list)
    out = check_output(request.out_dir(shot_list.name), "--out", folder=True)
    where = str(out.resolve())
    if any(c in where for c in "\n\r"):  # video.stitch lists a shot's parts one a line
        raise InputError(Problem(str(out), None, "--out", "expected a folder whose path has no line break "
                                 "(ffmpeg's list of a shot's segments names one file a line)"))
    try:
        where.encode()  # what ffmpeg is given
    except UnicodeEncodeError:
        raise InputError(Problem(ascii(str(out)), None, "--out", "expected a folder whose path is UTF-8 text "
                                 "(ffmpeg is given each video's path as text)")) from None
    if not request.restart:
        check_owner(RenderStore(out), shot_list)
    return Checked(request, shot_list, profile, plans, model_root, digests, out)


def shot_record(shot) -> dict:
    """A shot as the manifest keeps it (JSON values)."""
    return {**{k: v for k, v in shot.__dict__.items() if k not in ("prompts", "init_image")},
            "prompts": [[c.at, c.prompt] for c in shot.prompts],
            "init_image": str(shot.init_image) if shot.init_image else None}


def check_owner(store: RenderStore, shot_list: ShotList) -> None:
    """The folder is usable and belongs to this shot list (claims.owner_decision), read only. A
    folder rendered before folders recorded their owner belongs to the list its manifest names:
    the same file, or the same shots (the same list, named from another directory)."""
    store.check_usable()
    identity = shot_list_identity(shot_list.path)
    if not store.decision("owner").exists() and store.manifest_path.exists():
        recorded = store.read_manifest().get("shot_list")
        recorded = recorded if isinstance(recorded, dict) else {}
        path = recorded.get("path")
        try:
            same_file = isinstance(path, str) and "\x00" not in path and str(Path(path).resolve()) == identity["shot_list"]
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError in Python 3.11) or a name too long
            same_file = False
        same_shots = recorded.get("shots") == json.loads(json.dumps([shot_record(s) for s in shot_list.shots]))
        if isinstance(path, str) and not (same_file or same_shots):  # a manifest that names no list binds nothing
            raise InputError(Problem(str(store.root), None, "--out",
                                     f"this render folder was rendered from the shot list {path}; "
                                     f"{identity['shot_list']} cannot render into it (the same shot id in both "
                                     "would make one video for two requests)",
                                     "use another --out, or --restart to give the folder to this shot list"))
    owner_decision(store.decision("owner"), identity, store.root, record=False)
