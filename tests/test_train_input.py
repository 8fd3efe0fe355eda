"""`mmpl train` checks its whole config, data and starting model included, before it writes
anything: each hostile config exits 2 naming file and field, with no traceback, and the folder
around it (the config's, where `out` would go) is exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_limits import refused

STAGE = "stages:\n  - {stage: transformer, steps: 1}\n"


def config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text("version: 1\nout: run\n" + body)
    return path


CASES = {
    "data_folder_missing": ("data: no-such-clips\n" + STAGE, ["no-such-clips", "data: expected videos (*.mp4)"]),
    "data_folder_without_clips": ("data: empty\n" + STAGE, ["empty", "data: expected videos (*.mp4) with captions"]),
    "model_folder_missing": ("model: no-such-model\n" + STAGE, ["train.yaml", "model: expected a Diffusers-format Wan folder"]),
    "profile_missing": ("profile: no-such-profile\n" + STAGE, ["no-such-profile"]),
    "out_under_a_file": (STAGE, ["a-file is a file, not a folder"]),
    "nested_deep": ("stages: " + "[" * 3000 + "]" * 3000 + "\n", ["train.yaml:3: nested more than 64 levels deep"]),
    "thousands_of_digits": ("seed: " + "9" * 5000 + "\n" + STAGE, ["train.yaml:3: seed: expected a number of at most 15 digits"]),
    "nul_in_a_path": ('data: "clips\\0/../x"\n' + STAGE, ["train.yaml:3: a text contains a NUL character"]),
    "absurd_clip_length": ("stages:\n  - {stage: transformer, steps: 1, frames: 100001}\n",
                           ["train.yaml:4: stages[0].frames: expected a number <= 1025"]),
    "absurd_batch": ("stages:\n  - {stage: transformer, steps: 1, batch: 1000000}\n",
                     ["stages[0].batch: expected a number <= 4096"]),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_training_configs_write_nothing(case, tmp_path):
    body, expect = CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    path = config(tmp_path, body)
    if case == "out_under_a_file":
        path.write_text(path.read_text().replace("out: run", "out: a-file/run"))
    refused(tmp_path, "train", str(path), expect=expect)
