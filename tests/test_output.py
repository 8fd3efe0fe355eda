"""Output never lets user text talk to the terminal: Rich reads no markup in it, and control
characters (escape sequences, carriage returns, NUL) are printed as escapes."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

PROMPT = r'"a small red circle [/x] [bold]moving down\e]0;pwned\a\r on a cyan background"'  # YAML escapes


def _shots(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"version: 1\ndefaults: {{steps: 2, seed: 3}}\nshots:\n  - {{id: t, prompt: {PROMPT}, duration: 1}}\n")
    return path


def test_plan_prints_control_characters_as_escapes(tmp_path):
    proc = run_cli("plan", str(_shots(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\a" not in proc.stdout and "\r" not in proc.stdout
    assert r"\x1b]0;pwned\x07\r" in proc.stdout and "[/x] [bold]" in proc.stdout


@pytest.mark.slow
def test_a_render_on_a_terminal_with_markup_and_escapes_in_its_prompt(tmp_path, tiny_model_dir):
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mmpl_cli", "render", str(_shots(tmp_path)), "--out",
                             str(tmp_path / "out"), "--model-path", str(tiny_model_dir)],
                            cwd=REPO, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "MarkupError" not in text
    assert "\x1b]0;pwned" not in text  # the shot list's escape sequence never reached the terminal
