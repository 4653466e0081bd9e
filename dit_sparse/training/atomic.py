"""Atomic writes for training outputs: a file or a folder appears complete under its final name, or not at all.

Everything goes to a temporary name beside the target first and is renamed into place, so a run that is
killed mid-write (a preempted GPU job, Ctrl-C) never leaves a half-written checkpoint, CSV or plot that a
later ``--resume`` would trust.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

__all__ = ["atomic_file", "atomic_dir"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it to ``path`` (replacing it).

    The temporary name keeps ``path``'s suffix so writers that pick a format by extension (matplotlib's
    ``savefig``) still work. On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path``.

    An existing ``path`` is moved aside first and deleted only after the new folder is in place, so at
    every moment either the old or the new complete folder exists under ``path`` (or its ``.old`` name).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
