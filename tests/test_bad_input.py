"""Bad input: every malformed shot list and profile gets one clear message, exit code 2, no
traceback, and leaves the output folder exactly as it was (a previous render in it is untouched)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from conftest import run_cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))


def tree_digest(folder: Path) -> str:
    """Names, sizes, modification times and contents of everything under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def previous_render(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished render folder that bad input must not touch."""
    folder = tmp_path_factory.mktemp("previous")
    shots = folder.parent / "previous.yaml"
    shots.write_text("version: 1\ndefaults: {steps: 1}\nshots:\n  - {id: kept, prompt: x, duration: 0.5}\n")
    proc = run_cli("render", str(shots), "--out", str(folder), "--model-path", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    return folder


def expectations(path: Path) -> tuple[list[str], int | None]:
    text = path.read_text()
    words = re.search(r"^# expect: (.*)$", text, re.M).group(1).split(" | ")
    line = re.search(r"^# line: (\d+)$", text, re.M)
    return words, int(line.group(1)) if line else None


def assert_refused(proc, words: list[str], out_before: str | None, out: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("mmpl: error: ")
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    if out_before is None:
        assert not out.exists()
    else:
        assert tree_digest(out) == out_before


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
    assert len(list((CORPUS / "profiles").glob("*.yaml"))) >= 5


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_malformed_input_is_refused(case, previous_render):
    words, line = expectations(case)
    before = tree_digest(previous_render)
    proc = run_cli("render", str(case), "--out", str(previous_render))
    location = f"{case}:{line}" if line else None
    assert_refused(proc, words + ([location] if location else []), before, previous_render)


@pytest.mark.parametrize("case", CASES[::6], ids=lambda p: p.stem)
def test_no_output_folder_is_created_for_bad_input(case, tmp_path):
    words, _ = expectations(case)
    fresh = tmp_path / "never"
    assert_refused(run_cli("render", str(case), "--out", str(fresh)), words, None, fresh)


def test_binary_file(tmp_path):
    path = tmp_path / "shots.yaml"
    path.write_bytes(b"version: 1\n\x00\x01\x02\xff")
    assert_refused(run_cli("render", str(path), "--out", str(tmp_path / "o")), [str(path), "binary file"],
                   None, tmp_path / "o")


def test_not_utf8(tmp_path):
    path = tmp_path / "shots.yaml"
    path.write_bytes("version: 1\nshots:\n  - {id: a, prompt: caf\xe9, duration: 1}\n".encode("latin-1"))
    assert_refused(run_cli("render", str(path), "--out", str(tmp_path / "o")), [f"{path}:3", "not UTF-8"],
                   None, tmp_path / "o")


def test_missing_and_directory_shot_lists(tmp_path):
    assert_refused(run_cli("render", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")),
                   ["nope.yaml", "shot list not found"], None, tmp_path / "o")
    assert_refused(run_cli("render", str(tmp_path), "--out", str(tmp_path / "o")),
                   ["found a directory"], None, tmp_path / "o")


def test_output_folder_that_is_not_a_render_folder(tmp_path):
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\nshots:\n  - {id: a, prompt: x, duration: 1}\n")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    before = tree_digest(foreign)
    assert_refused(run_cli("render", str(shots), "--out", str(foreign)), ["not an mmpl render folder"], before, foreign)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    proc = run_cli("render", str(shots), "--out", str(a_file))
    assert proc.returncode == 2 and "expected a folder, found a file" in proc.stderr


@pytest.mark.slow
def test_cuda_asked_for_without_a_gpu(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    shots = tmp_path / "shots.yaml"
    shots.write_text("version: 1\nshots:\n  - {id: a, prompt: x, duration: 1}\n")
    proc = run_cli("render", str(shots), "--out", str(tmp_path / "o"), "--device", "cuda",
                   "--model-path", str(tiny_model_dir))
    assert_refused(proc, ["'cuda' asked for, but no CUDA GPU is visible"], None, tmp_path / "o")
