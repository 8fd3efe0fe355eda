"""Error types and exit codes. Knows nothing of torch, YAML or the CLI framework.

Exit codes: 0 done, 1 any other failure, 2 bad input, 3 interrupted and resumable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, newlines: bool = True) -> str:
    """User text made safe to print: control characters (escape sequences, NUL, carriage returns; also
    newlines unless `newlines`) shown as escapes, so a shot list cannot talk to the terminal."""
    out = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
    return out if newlines else out.replace("\n", "\\n")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file, located as precisely as we can."""

    file: str
    line: int | None  # 1-based; None when the problem is about the file as a whole
    field: str  # dotted path such as "shots[1].duration"; "" for the whole file
    message: str  # what was expected and what was found
    hint: str = ""  # how to fix it, e.g. "did you mean 'prompt'?"

    def render(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        field = f" {self.field}:" if self.field else ""
        hint = f" ({self.hint})" if self.hint else ""
        return printable(f"{where}:{field} {self.message}{hint}", newlines=False)


class MMPLError(Exception):
    """A failure we can explain to the user in one message, without a traceback."""

    exit_code = EXIT_FAILURE


class InputError(MMPLError):
    """Bad input: a shot list, a profile, an image or a path the user gave us."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(file="", line=None, field="", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [p.render().lstrip(": ") for p in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)
