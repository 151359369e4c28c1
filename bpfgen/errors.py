"""The exceptions bpfgen raises, each carrying the exit code the CLI turns it into.

Exit codes: 0 ok, 1 failure, 2 bad input or usage.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class BpfgenError(Exception):
    """A failure bpfgen can explain in one line. exit_code says how the CLI exits."""

    exit_code = EXIT_FAILURE

    def lines(self) -> list[str]:
        """The message as lines for stderr (most errors have one)."""
        return [str(self)]


class UsageError(BpfgenError):
    """Bad input from the user: a wrong argument, a missing build, an unknown node."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Problem:
    """One problem in a spec file: where it is and what is wrong."""

    file: str
    path: str  # YAML path, e.g. services[0].ports[0].nodePort ("" for the document)
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(UsageError):
    """A spec file with one or more problems; all of them are reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


def _terminated(signum: int, frame: Any) -> None:
    # One signal unwinds; those after it (a supervisor's repeated SIGTERM, Ctrl-C pressed
    # again) are ignored, so that they cannot cut the cleanup short half-way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def unwind_on_sigterm() -> None:
    """Make a SIGTERM (a supervisor's, a CI job's timeout, `kill`) or a SIGINT (Ctrl-C)
    raise KeyboardInterrupt once, so that it unwinds through the cleanup: what the process
    made in the kernel (a lab, a load half-applied) is undone, not left behind; further
    signals are ignored while it is (SIGKILL still ends a cleanup that hangs)."""
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _terminated)
