"""The one exception the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

__all__ = ["CLIError", "USAGE", "FAILURE"]

USAGE = 2  # bad arguments or input: a model folder, a size, a path the user can fix
FAILURE = 1  # the run itself failed (out of memory, for example)


class CLIError(Exception):
    """An error the user can act on: ``main`` prints ``dit-sparse: error: <message>`` and returns ``code``."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.message = message
        self.code = code
