"""One exception type for user-facing problems: a one-line message that names the problem and the fix."""

from __future__ import annotations

import sys
from typing import NoReturn


class CAQError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits with code 2."""


def print_error(message: str) -> int:
    """Print a command line's one ``error: ...`` line after what it printed so far; returns its exit code, 2."""
    sys.stdout.flush()  # what the run printed (e.g. the export path) comes first, also in a merged log
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: str) -> NoReturn:
    sys.exit(print_error(message))
