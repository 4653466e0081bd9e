"""The ``dit-sparse`` command line: ``generate``, ``presets``, ``compare``, ``masks`` (and ``finetune``).

``main(argv)`` parses, runs one command and returns its exit code: 0 on success, 2 for a usage or
input error (bad option, unknown preset, missing model folder, a size the model cannot take, an
unwritable output), 1 when the run itself fails (CUDA out of memory). Errors print one line on stderr,
``dit-sparse: error: <what was wrong and what to do>``, and leave no partial output files.

``dit-sparse finetune`` comes from ``dit_sparse.finetune`` when that module exists: its
``add_parser(subparsers)`` registers the sub-command and sets ``func`` (``args -> exit code``) as
its default, like the commands here.

Example::

    dit-sparse generate --prompt "a red ball bouncing on grass" --preset fast --out ball.mp4
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import compare, generate, masks, presets_cmd
from .errors import CLIError, exit_code

__all__ = ["main", "build_parser", "CLIError"]

_COMMANDS = (generate, presets_cmd, compare, masks)
_OPTIONAL_COMMANDS = ("dit_sparse.finetune",)  # modules with add_parser(subparsers), registered if present


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="dit-sparse",
        description="Faster video diffusion transformers with sparse attention.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        module.add_parser(sub)
    for name in _OPTIONAL_COMMANDS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on bad options (2, message printed)
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return exit_code("dit-sparse", args.func, args)
    except KeyboardInterrupt:
        print("dit-sparse: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from dit_sparse import __version__

    return __version__
