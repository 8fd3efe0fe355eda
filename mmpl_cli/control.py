"""Run control shared by the CLI and the workers, light enough to import before torch: the stop flag
that signal handlers set, the interruption it raises, and who a worker is."""

from __future__ import annotations

from dataclasses import dataclass

from mmpl_cli.errors import EXIT_INTERRUPTED, MMPLError


class Interrupted(MMPLError):
    """A signal asked us to stop; finished tasks are kept and the same command resumes."""

    exit_code = EXIT_INTERRUPTED


class StopFlag:
    """Set from a signal handler; checked between denoising steps and between tasks."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    def check(self) -> None:
        if self.reason is not None:
            raise Interrupted(f"stopped by {self.reason}")


@dataclass(frozen=True)
class Worker:
    """Who is rendering: one of possibly many processes cooperating through the render folder."""

    name: str = "main"
    claim_timeout: float = 120.0  # seconds without a heartbeat after which a claim is taken over
    poll: float = 0.2  # seconds between looks at the folder while others hold every ready task
    team: int = 1  # workers expected on this render: task priorities are tuned for that many
