"""The house rules the code keeps: module sizes, an import graph without cycles, a store that only
stores, and help text that reads well (defaults shown, no stray ".", -h)."""

from __future__ import annotations

import ast
import re

import pytest
from typer.testing import CliRunner

from conftest import REPO

PACKAGE = REPO / "mmpl_cli"
COMMANDS = ["render", "status", "plan", "slurm", "doctor", "eval", "train"]


def _imports(path) -> tuple[set[str], set[str]]:
    """(modules of the package imported at module level, ... imported anywhere) by one file."""
    top, anywhere = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmpl_cli"):
            names = [node.module] + ([f"mmpl_cli.{a.name}" for a in node.names] if node.module == "mmpl_cli" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mmpl_cli")]
        mods = {n.split(".")[1] for n in names if n.count(".") >= 1 and (PACKAGE / f"{n.split('.')[1]}.py").exists()}
        anywhere |= mods
        if node in tree.body:
            top |= mods
    return top, anywhere


def test_no_module_is_too_long_and_the_module_level_import_graph_has_no_cycle():
    sizes = {p.stem: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 420 and m != "wan"} == {}
    assert sizes["cli"] < 320
    graph = {p.stem: _imports(p)[0] - {p.stem} for p in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_each_layer_imports_only_what_it_should():
    store = _imports(PACKAGE / "store.py")[1]
    assert not store & {"video", "claims", "runtime", "render"}  # the store only stores
    render = _imports(PACKAGE / "render.py")[1]
    assert not render & {"runtime", "launch", "cli", "claims", "video"}  # MMPL's tasks, nothing of the worker loop
    for pure in ("plan", "shotlist", "profiles", "terms", "schedule", "memory", "files", "claims", "store", "results",
                 "vocabulary"):
        source = (PACKAGE / f"{pure}.py").read_text()
        assert not re.search(r"^(import torch|from torch)", source, re.M), f"{pure} imports torch at module level"


def _help(*args: str) -> str:
    from mmpl_cli.cli import app

    result = CliRunner().invoke(app, [*args], prog_name="mmpl", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_reads_well_and_h_is_help(command):
    args = [command] if command else []
    text = _help(*args, "--help")
    assert _help(*args, "-h") == text
    assert not re.search(r"\s\.(\s|$)", text), f"a stray '.' in:\n{text}"  # what Rich left of "[default: ...]"
    if command is None:
        listed = re.findall(r"^  (\w+)  ", text.split("Commands:")[1], re.M)
        assert listed == COMMANDS  # in the order a user needs them
        assert all(len(line) <= 100 for line in text.splitlines())
        return
    # every option with a value shows its default, as written
    for block in re.split(r"\n(?=  -)", text.split("Options:")[1].strip("\n")):
        option = block.split()[0]
        if option in ("-h,", "--json", "--restart", "--storyboard", "--gantt", "--plot", "--segments-from", "--prepare") \
                or "required]" in block:  # flags, and outputs that are off unless named
            continue
        assert "[default:" in " ".join(block.split()), f"{command} {option} shows no default:\n{block}"
    if command == "render":
        text = " ".join(text.split())
        assert "--out FOLDER The render folder. [default: (renders/<shot list name>)]" in text
        assert "[default: (one per visible GPU, else 1); x>=1]" in text
