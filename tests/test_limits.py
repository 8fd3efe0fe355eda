"""Input that used to reach Python's own errors or exhaust memory: every YAML input (shot list,
profile, training config) is read by one bounded reader (size, depth, NUL, numbers), every numeric
profile field has a stated range, and an init image is measured before it is decoded.

Each case runs `mmpl` in a real subprocess and checks the exit code (2), the message (file, line,
field), that no traceback is printed, and that nothing was written anywhere around the input: the
whole temporary folder is listed before and after."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from conftest import REPO, run_cli

SHOT = "version: 1\nshots:\n  - {id: a, prompt: x, duration: 2%s}\n"
TINY = (REPO / "profiles" / "tiny.yaml").read_text()


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        out[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return out


def refused(tmp_path: Path, *args: str, expect: list[str]) -> str:
    before = listing(tmp_path)
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr, proc.stderr
    for words in expect:
        assert words in proc.stderr, proc.stderr
    assert listing(tmp_path) == before, "something was written"
    return proc.stderr


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only its header: what a decompression bomb shows before any pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


SHOT_LISTS = {
    "deep_list": ("version: 1\nshots: " + "[" * 5000 + "]" * 5000 + "\n", ["s.yaml:2: nested more than 64 levels deep"]),
    "deep_map": ("version: 1\nshots:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)),
                 ["nested more than 64 levels deep"]),
    "nul_in_prompt": ('version: 1\nshots:\n  - {id: a, prompt: "x\\0y", duration: 2}\n',
                      ["s.yaml:3: a text contains a NUL character"]),
    "nul_in_key": ('version: 1\nshots:\n  - {id: a, prompt: x, duration: 2, "see\\x00d": 1}\n',
                   ["s.yaml:3: a text contains a NUL character"]),
    "thousands_of_digits": (SHOT % (", seed: " + "7" * 6000),
                            ["s.yaml:3: shots[0].seed: expected a number of at most 15 digits, found a larger one"]),
    "digits_in_a_list": ("version: 1\nshots:\n  - id: a\n    duration: 9\n    prompts:\n      - {at: 0, prompt: x}\n"
                         "      - {at: " + "1" * 30 + ", prompt: y}\n",
                         ["s.yaml:7: shots[0].prompts[1].at: expected a number of at most 15 digits"]),
    "float_overflow": (SHOT % ", guidance: 1.0e999", ["s.yaml:3: shots[0].guidance: expected a finite number, found inf"]),
    "recursive_alias": ("version: 1\nshots: &s [*s]\n", ["s.yaml:2:", "recursive"]),
    "tagged_float": (SHOT % ", guidance: !!float abc", ["s.yaml:3: expected a number, found 'abc'"]),
    "tagged_int": (SHOT % ", seed: !!int abc", ["s.yaml:3: expected a whole number, found 'abc'"]),
    "sexagesimal_overflow": (SHOT % (", guidance: " + ":".join(["1"] * 200) + ".5"), ["s.yaml:3: expected a number"]),
    "over_8_mb": ("# " + "x" * (8 << 20) + "\n" + SHOT % "", ["s.yaml: expected a shot list of at most 8 MB"]),
}


@pytest.mark.parametrize("case", SHOT_LISTS, ids=str)
def test_hostile_shot_lists(case, tmp_path):
    text, expect = SHOT_LISTS[case]
    (tmp_path / "s.yaml").write_text(text)
    refused(tmp_path, "render", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), expect=expect)


@pytest.mark.parametrize("stream", ["/dev/zero", "/dev/urandom"])
def test_endless_streams_are_read_to_the_limit_only(stream, tmp_path):
    refused(tmp_path, "render", stream, "--out", str(tmp_path / "out"),
            expect=[f"{stream}: expected a shot list of at most 8 MB, found a larger file (or an endless stream)"])
    (tmp_path / "s.yaml").write_text(SHOT % "")
    refused(tmp_path, "plan", str(tmp_path / "s.yaml"), "--profile", stream,
            expect=[f"{stream}: expected a profile of at most 8 MB"])


PROFILES = {
    "empty_anchor": (("terminal_anchor: [19, 20]", "terminal_anchor: []"),
                     ["layout.terminal_anchor: expected at least one latent index, found none"]),
    "empty_group": (("plan: {targets: [2, 3, 10, 11, 12, 19, 20], sees: [0, 1]}", "plan: {targets: [], sees: [0, 1]}"),
                    ["layout.plan.targets: expected at least one latent index"]),
    "absurd_latents": (("latents: 21", "latents: 1000000000000"), ["p.yaml:", "layout.latents: expected a number <= 256"]),
    "absurd_fps": (("fps: 16", "fps: 1000000000"), ["video.fps: expected a number <= 240"]),
    "absurd_width": (("width: 96", "width: 9600000"), ["video.width: expected a number <= 8192"]),
    "empty_image_latents": (("    image: [0]\n", "    image: []\n"),
                            ["layout.image_to_video.image: expected at least one latent index"]),
    "absurd_text_length": (("max_sequence_length: 64", "max_sequence_length: 100000000"),
                           ["text.max_sequence_length: expected a number <= 4096"]),
}


@pytest.mark.parametrize("case", PROFILES, ids=str)
def test_hostile_profiles(case, tmp_path):
    (old, new), expect = PROFILES[case]
    assert old in TINY
    (tmp_path / "p.yaml").write_text(TINY.replace(old, new))
    (tmp_path / "s.yaml").write_text(SHOT % "")
    refused(tmp_path, "plan", str(tmp_path / "s.yaml"), "--profile", str(tmp_path / "p.yaml"), expect=expect)
    refused(tmp_path, "render", str(tmp_path / "s.yaml"), "--profile", str(tmp_path / "p.yaml"),
            "--out", str(tmp_path / "out"), expect=expect)


def test_a_date_like_id_is_text(tmp_path):
    (tmp_path / "s.yaml").write_text("version: 1\nshots:\n  - {id: 2024-02-30, prompt: x, duration: 2}\n"
                                     "  - {id: 2024-02-03, prompt: x, duration: 2}\n")
    proc = run_cli("plan", str(tmp_path / "s.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "2024-02-30:" in proc.stdout and "2024-02-03:" in proc.stdout


def test_images_are_measured_before_they_are_decoded(tmp_path):
    from PIL import Image

    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))  # 10^10 pixels: PIL's own bomb error
    (tmp_path / "wide.png").write_bytes(png_header(20_000, 8))  # under PIL's limit, over mmpl's side
    Image.new("RGB", (9000, 2)).save(tmp_path / "long.png")  # a real image, decodable, too long a side
    shots = "version: 1\nshots:\n" + "".join(
        f"  - {{id: {name}, prompt: x, duration: 2, init_image: {name}.png}}\n" for name in ("bomb", "wide", "long"))
    (tmp_path / "s.yaml").write_text(shots)
    refused(tmp_path, "render", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), expect=[
        "s.yaml:3: bomb.init_image:", "expected an image of at most 8192x8192 pixels, found a far larger one",
        "s.yaml:4: wide.init_image:", "found 20000x8",
        "s.yaml:5: long.init_image:", "found 9000x2"])
    os.mkfifo(tmp_path / "fifo.png")  # would block a reader forever
    (tmp_path / "f.yaml").write_text(SHOT % ", init_image: fifo.png")
    refused(tmp_path, "render", str(tmp_path / "f.yaml"), "--out", str(tmp_path / "out"),
            expect=["f.yaml:3: shots[0].init_image: expected an image file, found something that is not a plain file"])
