"""Every shipped example and profile parses; the shot-list rules hold; errors name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpl_cli.errors import InputError
from mmpl_cli.memory import profile_peaks
from mmpl_cli.plan import plan_shot_list
from mmpl_cli.profiles import builtin_profiles_dir, list_profiles, load_profile
from mmpl_cli.shotlist import load_shot_list

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("train"))
TRAIN_EXAMPLES = sorted((REPO / "examples").glob("train*.yaml"))
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def test_shipped_profiles_are_the_repository_profiles():
    # the package finds exactly the repository's profiles, with the same contents
    shipped = {p.name: p.read_bytes() for p in builtin_profiles_dir().glob("*.yaml")}
    assert shipped == {p.name: p.read_bytes() for p in PROFILES}
    assert {"tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"} <= set(list_profiles())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_parses(path):
    profile = load_profile(str(path))
    assert profile.name == path.stem
    assert profile.segment_frames == 81
    assert profile.layout.plan.targets == (2, 3, 10, 11, 12, 19, 20)
    assert profile.layout.populate_stage_one.sees == (0, 1, 2, 3, 10, 11, 12)  # 19-20 hidden
    assert set(profile.costs) >= {"initial", "plan", "populate_stage_one", "populate_stage_two"}
    assert not profile.memory_gb  # an override only: the memory model gives both modes' peaks
    assert set(profile_peaks(profile)) == {"terminal", "midpoint"}


def test_paper_settings_in_the_wan_profiles():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        p = load_profile(name)
        assert (p.width, p.height, p.fps) == (832, 480, 16)
        assert (p.sampler.scheduler, p.sampler.steps, p.sampler.shift, p.sampler.guidance) == ("unipc", 50, 5.0, 5.0)
    big = load_profile("wan2.1-t2v-14b")
    assert [big.costs[k] for k in ("initial", "plan", "populate_stage_one", "populate_stage_two")] == [25, 109, 113, 148]
    assert big.architecture == "wan2.1-14b" and load_profile("wan2.1-t2v-1.3b").architecture == "wan2.1-1.3b"


def test_model_path_override_order(monkeypatch, tmp_path):
    p = load_profile("wan2.1-t2v-1.3b")
    monkeypatch.delenv("MMPL_WAN21_T2V_1_3B", raising=False)
    assert p.resolve_model_path() == Path("~/models/Wan2.1-T2V-1.3B-Diffusers").expanduser()
    monkeypatch.setenv("MMPL_WAN21_T2V_1_3B", str(tmp_path))
    assert p.resolve_model_path() == tmp_path
    assert p.resolve_model_path("/elsewhere") == Path("/elsewhere")
    monkeypatch.chdir(tmp_path)  # given on the command line or in the environment: from the working directory
    assert p.resolve_model_path("weights/here") == tmp_path / "weights/here"
    monkeypatch.setenv("MMPL_WAN21_T2V_1_3B", "relative")
    assert p.resolve_model_path() == tmp_path / "relative"
    monkeypatch.setenv("MMPL_WAN21_T2V_1_3B", str(tmp_path))
    assert p.missing_model_files() == ["transformer/config.json", "transformer/*.safetensors", "vae/config.json",
                                       "vae/*.safetensors", "text_encoder/config.json",
                                       "text_encoder/*.safetensors", "tokenizer/tokenizer_config.json"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_parses_and_plans(path):
    shots = load_shot_list(path)
    assert shots.shots
    for seeding in ("terminal", "midpoint"):
        plans = plan_shot_list(shots, load_profile(shots.profile), seeding)
        assert all(p.frames == sum(s.kept for s in p.segments) for p in plans)


@pytest.mark.parametrize("path", TRAIN_EXAMPLES, ids=lambda p: p.stem)
def test_every_training_example_parses(path):
    from mmpl_cli.train import load_train_config

    config = load_train_config(path)
    kinds = [s.stage for s in config.stages]
    assert kinds[-1] == "transformer"
    assert config.out == path.parent / "../runs" / path.stem.removeprefix("train-")
    if path.stem == "train-tiny":
        assert set(kinds[:-1]) == {"vae"}  # the autoencoder before the denoiser
    else:  # the paper's fine-tuning of a released model (Sec. 4, Table 3): self-attention, 1e-5, batch 32
        first = config.stages[0]
        assert config.model == "profile" and kinds == ["transformer"] and config.mixed_precision == "bf16"
        assert (first.trainable, first.lr, first.batch, first.steps) == ("self_attention", 1e-5, 32, 8000)


def test_example_has_a_long_scheduled_shot():
    shots = load_shot_list(REPO / "examples" / "shots.yaml")
    assert len(shots.shots) >= 2
    plans = plan_shot_list(shots, load_profile("tiny"), "terminal")
    long = [p for p in plans if len(p.segments) >= 3 and len(p.shot.prompts) > 1]
    assert long, "examples/shots.yaml needs a shot of >= 3 segments with a prompt schedule"
    # each segment is conditioned on the prompt in force at its start
    p = long[0]
    for seg in p.segments:
        assert seg.prompt == p.shot.prompt_at(seg.video_from / p.fps)
    assert len({s.prompt for s in p.segments}) > 1


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shots.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, """version: 1
defaults: {seed: 5, negative_prompt: "dull", steps: 3, guidance: 4.0}
shots:
  - {id: a, prompt: "x", duration: 1}
  - {id: b, prompt: "y", duration: 2, seed: 9, steps: 7, negative_prompt: "", shift: 3.0, scheduler: euler}
""")
    a, b = load_shot_list(path).shots
    assert (a.seed, a.negative_prompt, a.sampler_overrides) == (5, "dull", {"steps": 3, "guidance": 4.0})
    assert (b.seed, b.negative_prompt) == (9, "")
    assert b.sampler_overrides == {"steps": 7, "guidance": 4.0, "shift": 3.0, "scheduler": "euler"}
    plan = plan_shot_list(load_shot_list(path), load_profile("tiny"), "terminal")[1]
    assert (plan.sampler.steps, plan.sampler.scheduler, plan.sampler.shift, plan.sampler.guidance) == (7, "euler", 3.0, 4.0)


@pytest.mark.parametrize("body, line, words", [
    ("version: 1\nshots:\n  - {id: a, promt: x, duration: 1}\n", 3, ["promt", "did you mean 'prompt'"]),
    ("version: 1\nshots:\n  - id: a\n    prompt: x\n    duration: -2\n", 5, ["shots[0].duration", "> 0"]),
    ("version: 1\nshots:\n  - {id: a, prompt: x, duration: .inf}\n", 3, ["finite"]),
    ("version: 1\nshots:\n  - {id: ../up, prompt: x, duration: 1}\n", 3, ["shots[0].id", "'/'"]),
    ("version: 1\nshots:\n  - {id: a, prompt: x, duration: 1}\n  - {id: a, prompt: y, duration: 1}\n", 4,
     ["duplicate shot id 'a'", "line 3"]),
    ("version: 1\nshots:\n  - id: a\n    duration: 9\n    prompts:\n      - {at: 0, prompt: x}\n"
     "      - {at: 5, prompt: y}\n      - {at: 4, prompt: z}\n", 8, ["increasing order"]),
    ("version: 1\nshots:\n  - id: a\n    duration: 3\n    prompts:\n      - {at: 0, prompt: x}\n"
     "      - {at: 4, prompt: y}\n", 7, ["inside the shot"]),
    ("version: 2\nshots: []\n", 1, ["version 2"]),
    ("version: 1\nshots:\n  - {id: a, prompt: x, duration: 1, init_image: nope.png}\n", 3, ["image not found"]),
    ("version: 1\nshots:\n  - {id: a, prompt: x, prompts: [{at: 0, prompt: y}], duration: 1}\n", 3, ["both"]),
    ("version: 1\nshots:\n  - {id: a, prompt: x, duration: 1\n", 4, ["invalid YAML"]),
])
def test_bad_shot_lists_name_file_line_and_field(tmp_path, body, line, words):
    path = _write(tmp_path, body)
    with pytest.raises(InputError) as info:
        load_shot_list(path)
    message = str(info.value)
    assert f"{path}:{line}" in message
    for w in words:
        assert w in message


def test_all_problems_are_reported_together(tmp_path):
    path = _write(tmp_path, "version: 1\nshots:\n  - {id: a, prompt: x, duration: 0}\n  - {id: 'b c', prompt: y, duration: 1}\n")
    with pytest.raises(InputError) as info:
        load_shot_list(path)
    assert len(info.value.problems) == 2


def test_yaml_object_tags_are_refused(tmp_path):
    path = _write(tmp_path, "version: 1\nshots: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_shot_list(path)
