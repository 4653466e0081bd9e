"""The one exception the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["CLIError", "USAGE", "FAILURE", "exit_code"]

USAGE = 2  # bad arguments or input: a model folder, a size, a path the user can fix
FAILURE = 1  # the run itself failed (out of memory, for example)


class CLIError(Exception):
    """An error the user can act on: ``main`` prints ``dit-sparse: error: <message>`` and returns ``code``."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


def exit_code(prog: str, run: Callable, args) -> int:
    """``run(args)``'s exit code; a :class:`CLIError` it raises is printed as ``<prog>: error: <message>`` on
    stderr and its code returned (the ``dit-sparse`` command and the scripts that share its errors)."""
    try:
        return int(run(args))
    except CLIError as e:
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        return e.code
