"""Output files of the CLI: checked before any work starts, published all at once, never half-written.

A command declares every file it will write in an :class:`OutputSet` up front. ``OutputSet.check()``
fails fast (before the model loads) when a file cannot be written. While the command runs, each file is
written to a hidden temporary name next to its final place; ``commit()`` renames them all into place at
the end. If anything fails before that, the temporaries are removed, so an error never leaves a partial
video, report or picture behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import uuid

from .._atomic import atomic_write_text, publish
from .errors import CLIError

__all__ = ["OutputSet", "write_json"]


def write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (temp file + rename; NaN / infinity raise ValueError)."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n", parents=False)


def _probe_writable(folder: pathlib.Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(prefix=".dit-sparse-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


class OutputSet:
    """The files one command writes, published together by :meth:`commit`.

    ``out_dir`` (optional) is a folder the files go into; it is created at commit time if it does not
    exist yet, so a failed run leaves no empty folder either. Use as a context manager: leaving the
    block without ``commit()`` removes every temporary file.
    """

    def __init__(self, out_dir: str | os.PathLike | None = None):
        self.out_dir = pathlib.Path(out_dir) if out_dir is not None else None
        self._finals: list[pathlib.Path] = []
        self._temps: dict[pathlib.Path, pathlib.Path] = {}
        self._made_dir = False
        self._committed = False

    # ------------------------------------------------------------------ declaring
    def add(
        self, path: str | os.PathLike, suffixes: tuple[str, ...] | None = None, what: str = "output"
    ) -> pathlib.Path:
        """Declare one output file; relative names go into ``out_dir`` when there is one."""
        path = pathlib.Path(path)
        if self.out_dir is not None and not path.is_absolute() and path.parent == pathlib.Path("."):
            path = self.out_dir / path
        if suffixes and path.suffix.lower() not in suffixes:
            raise CLIError(f"{what} '{path}' must end with {' or '.join(suffixes)}")
        if path in self._finals:
            raise CLIError(f"'{path}' is given for two outputs; give each output its own file")
        self._finals.append(path)
        return path

    def check(self) -> None:
        """Raise :class:`CLIError` unless every declared file can be written (nothing is created)."""
        if self.out_dir is not None:
            d = self.out_dir
            if d.exists() and not d.is_dir():
                raise CLIError(f"output folder '{d}' exists and is not a folder; choose another --out-dir")
            target = d if d.exists() else d.parent
            if not target.is_dir():
                raise CLIError(f"cannot create output folder '{d}': '{target}' does not exist; create it first")
            if not _probe_writable(target):
                raise CLIError(f"cannot write to '{target}' (permission denied or read-only); choose another path")
        for path in self._finals:
            if path.is_dir():
                raise CLIError(f"output '{path}' is a folder; give a file name")
            parent = path.parent
            if self.out_dir is not None and parent == self.out_dir and not parent.exists():
                continue  # created at commit; its parent was checked above
            if not parent.is_dir():
                raise CLIError(f"cannot write '{path}': folder '{parent}' does not exist; create it first")
            if not _probe_writable(parent):
                raise CLIError(f"cannot write '{path}': '{parent}' is not writable; choose another path")

    # ------------------------------------------------------------------ writing
    def temp(self, path: pathlib.Path) -> pathlib.Path:
        """The temporary name to write ``path`` to (same folder, same suffix, hidden)."""
        if path not in self._finals:
            raise ValueError(f"'{path}' was not declared with OutputSet.add")
        if path not in self._temps:
            self._ensure_dir(path.parent)
            self._temps[path] = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
        return self._temps[path]

    def _ensure_dir(self, folder: pathlib.Path) -> None:
        if self.out_dir is not None and folder == self.out_dir and not folder.exists():
            folder.mkdir()
            self._made_dir = True

    def commit(self) -> list[pathlib.Path]:
        """Rename every written temporary into place; returns the final paths written."""
        missing = [p for p in self._finals if p not in self._temps or not self._temps[p].exists()]
        if missing:
            raise RuntimeError(f"outputs declared but never written: {', '.join(map(str, missing))}")
        for final, tmp in self._temps.items():
            publish(tmp, final)  # usual permissions (writers using mkstemp leave 0600), then rename
        self._committed = True
        return list(self._finals)

    def discard(self) -> None:
        """Remove every temporary file (and the output folder if this run created it and it is empty)."""
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._temps.clear()
        if self._made_dir and self.out_dir is not None:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.discard()
