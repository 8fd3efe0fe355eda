"""Safe, bounded YAML loading that remembers where every value came from, plus field checks.

Stops at plain Python values: mappings come back as `Located` dicts that know the line of each
key, so that the shot-list and profile layers can name file, line and field in every error.
Only the safe loader is used: no object tags, no arbitrary constructors. Every shot list, profile
and training config goes through `load_yaml`, which holds the limits the README states: at most
MAX_INPUT_BYTES read (so /dev/zero or an endless pipe is refused, not read to exhaustion), nesting
at most MAX_DEPTH deep, no NUL in any text; a whole number too long to convert is kept as `Huge`,
and Fields.get refuses, by field, whole numbers over MAX_INT and numbers that are not finite.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
import math
import re
from pathlib import Path
from typing import Any

import yaml

from mmpl_cli.errors import InputError, Problem
from mmpl_cli.files import TooLarge, read_bounded

MAX_INPUT_BYTES = 8 << 20  # a thousand shots with long prompts is about 1 MB
MAX_DEPTH = 64  # a shot list nests 4 deep
MAX_INT = 10**15  # larger whole numbers are refused: no field needs them, and a float cannot hold them all


class Located(dict):
    """A mapping from YAML that knows its own line and the line of each key (1-based)."""

    def __init__(self, *args, line: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.line = line
        self.key_lines: dict[str, int] = {}


class LocatedList(list):
    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    depth = 0

    def compose_node(self, parent, index):
        # PyYAML composes recursively: thousands of levels would end in RecursionError
        if self.depth >= MAX_DEPTH:
            raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML with a value outside mmpl's limits (not a syntax error)."""


def _refuse(node: yaml.Node, message: str):
    raise _Refused(None, None, message, node.start_mark)


def _construct_str(loader: _LineLoader, node: yaml.ScalarNode) -> str:
    value = loader.construct_scalar(node)
    if "\x00" in value:
        _refuse(node, "a text contains a NUL character")
    return value


@dataclass(frozen=True)
class Huge:
    """A whole number too long to convert (Python refuses over 4300 digits with a ValueError of
    its own): kept as its text, so the field that holds it is refused by name (Fields.get)."""

    text: str


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int | Huge:
    text = loader.construct_scalar(node)
    if len(text.replace("_", "").lstrip("+-")) > 24:
        return Huge(text)
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except (ValueError, OverflowError):  # `!!int abc`
        _refuse(node, f"expected a whole number, found '{text[:40]}'")


def _construct_float(loader: _LineLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    try:
        return yaml.SafeLoader.construct_yaml_float(loader, node)
    except (ValueError, OverflowError):  # `!!float abc`, a sexagesimal float too long for a float
        _refuse(node, f"expected a number, found '{text[:40]}'")


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    out = Located(line=node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain words", key_node.start_mark
            )
        key = str(key)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LocatedList:
    out = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_LineLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
# no field is a date: `id: 2024-02-30` (not a date at all) or `2024-02-03` stays the text it is
_LineLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_str)


if getattr(yaml, "__with_libyaml__", False):
    class _CLineLoader(yaml.cyaml.CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """_LineLoader's constructors over libyaml's parser and composer (C): a thousand shots parse in
        a seventh of the time. Used only for a document that nests at most MAX_DEPTH deep; any error
        is reported by _LineLoader, so messages and lines are the same either way (libyaml reads a
        tab after `key:` as a space, which PyYAML's scanner refuses; nothing else differed on the
        test suite's 64 YAML files, good and bad, or on 28 edge cases)."""

        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _CLineLoader.yaml_constructors = _LineLoader.yaml_constructors
else:  # PyYAML built without libyaml: the Python loader alone
    _CLineLoader = None


def _shallow(text: str) -> bool:
    """Whether libyaml reads `text` as nesting at most MAX_DEPTH deep (False on any error)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.CSafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    return False
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        return False
    return True


def _load(text: str) -> Any:
    if _CLineLoader is not None and _shallow(text):
        try:
            return yaml.load(text, Loader=_CLineLoader)  # noqa: S506 - safe constructors only
        except yaml.YAMLError:
            pass  # said again below, by the loader whose messages the tests and users know
    return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader


SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def load_yaml(path: Path, what: str) -> Any:
    """Read a YAML file safely; every failure is an InputError naming the file and line."""
    name = str(path)
    try:
        raw = read_bounded(path, MAX_INPUT_BYTES)
    except TooLarge:
        raise InputError(Problem(name, None, "", f"expected a {what} of at most {MAX_INPUT_BYTES >> 20} MB, "
                                 "found a larger file (or an endless stream)")) from None
    except FileNotFoundError:
        raise InputError(Problem(name, None, "", f"{what} not found")) from None
    except IsADirectoryError:
        raise InputError(Problem(name, None, "", f"expected a {what} file, found a directory")) from None
    except OSError as exc:
        raise InputError(Problem(name, None, "", f"cannot read {what}: {exc.strerror}")) from None
    if b"\x00" in raw:
        raise InputError(Problem(name, None, "", f"expected a YAML {what}, found a binary file"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(Problem(name, line, "", "expected UTF-8 text, found bytes that are not UTF-8")) from None
    try:
        return _load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        detail = exc.problem or str(exc)
        raise InputError(Problem(name, line, "", detail if isinstance(exc, _Refused) else f"invalid YAML: {detail}")) from None
    except yaml.YAMLError as exc:
        raise InputError(Problem(name, None, "", f"invalid YAML: {exc}")) from None


class Fields:
    """Collects problems while reading typed fields out of one Located mapping."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems

    def add(self, line: int | None, field: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, line, field, message, hint))

    def line_of(self, mapping: Any, key: str) -> int | None:
        if isinstance(mapping, Located):
            return mapping.key_lines.get(key, mapping.line)
        return None

    def mapping(self, value: Any, line: int | None, field: str) -> Located | None:
        if isinstance(value, Located):
            return value
        self.add(line, field, f"expected a mapping of keys to values, found {describe(value)}")
        return None

    def unknown_keys(self, mapping: Located, allowed: set[str] | list[str], prefix: str) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(sorted(allowed))}"
                self.add(mapping.key_lines.get(key), join(prefix, key), f"unknown key '{key}'", hint)

    def get(self, mapping: Located, key: str, prefix: str, kind: str, *, required: bool = False,
            default: Any = None, minimum: float | None = None, exclusive_minimum: float | None = None,
            maximum: float | None = None, choices: list[str] | None = None) -> Any:
        """Read mapping[key] as `kind` ('str', 'int', 'float', 'bool', 'list', 'mapping')."""
        field = join(prefix, key)
        line = self.line_of(mapping, key)
        if key not in mapping or mapping[key] is None:
            if required:
                self.add(mapping.line, field, f"missing required field '{key}'")
            return default
        value = mapping[key]
        if kind == "str":
            if not isinstance(value, str):
                self.add(line, field, f"expected text, found {describe(value)}")
                return default
            if choices is not None and value not in choices:
                close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else ""
                self.add(line, field, f"expected one of {', '.join(choices)}, found '{value}'", hint)
                return default
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                self.add(line, field, f"expected true or false, found {describe(value)}")
                return default
            return value
        if kind in ("int", "float"):
            if kind == "float" and isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
                value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as text; everyone means the number
            if isinstance(value, Huge):
                value = MAX_INT + 1  # refused below, by name
            ok = isinstance(value, int) and not isinstance(value, bool)
            if kind == "float":
                ok = ok or isinstance(value, float)
            if not ok:
                expected = "a whole number" if kind == "int" else "a number"
                self.add(line, field, f"expected {expected}, found {describe(value)}")
                return default
            if isinstance(value, int) and abs(value) > MAX_INT:  # also what a float cannot hold
                self.add(line, field, f"expected a number of at most {len(str(MAX_INT)) - 1} digits, found a larger one")
                return default
            if isinstance(value, float) and not math.isfinite(value):
                self.add(line, field, f"expected a finite number, found {value}")
                return default
            if minimum is not None and value < minimum:
                self.add(line, field, f"expected a number >= {minimum:g}, found {value:g}")
                return default
            if exclusive_minimum is not None and value <= exclusive_minimum:
                self.add(line, field, f"expected a number > {exclusive_minimum:g}, found {value:g}")
                return default
            if maximum is not None and value > maximum:
                self.add(line, field, f"expected a number <= {maximum:g}, found {value:g}")
                return default
            return float(value) if kind == "float" else int(value)
        if kind == "list":
            if not isinstance(value, list):
                self.add(line, field, f"expected a list, found {describe(value)}")
                return default
            return value
        if kind == "mapping":
            return self.mapping(value, line, field) or default
        raise ValueError(f"unknown field kind {kind!r}")


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Huge):
        return f"a whole number of {len(value.text)} characters"
    if isinstance(value, bool):
        return f"'{str(value).lower()}' (true/false)"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the text '{shown}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
