"""Atomic writes for the whole package: a file or a folder appears complete under its final name, or not at all.

Everything goes to a temporary name beside the target first and is renamed into place (``os.replace``,
atomic within one file system), so a process that is killed mid-write (a preempted GPU job, Ctrl-C, a
full disk) never leaves a half-written cache, checkpoint, report or picture that a later run would trust.

* :func:`atomic_file` / :func:`atomic_dir` - context managers yielding a temporary path to write to;
* :func:`atomic_write_text` / :func:`atomic_write_bytes` - the one-call form for data already in memory;
* :func:`publish` - the final step alone (permissions + rename), for callers that manage their own
  temporary names, such as the CLI's set of outputs renamed together at the end.

``tempfile.mkstemp`` / ``mkdtemp`` create owner-only entries (0600 / 0700). Before the rename every
temporary gets the mode a plain ``open(path, "w")`` / ``os.mkdir(path)`` would have given it
(``0o666`` / ``0o777`` minus the umask), so outputs are readable by the same people as any other file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
import tempfile
from typing import Iterator

__all__ = ["atomic_file", "atomic_dir", "atomic_write_text", "atomic_write_bytes", "publish", "default_mode"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``).

    ``os.umask`` can only be read by setting it, which briefly gives every other thread's new files
    mode 0666; the ``/proc`` line avoids that window.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """The permission bits a new file (``0o666``) or folder (``0o777``) gets under the current umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the finished temporary ``tmp`` (a file or a folder) the usual permissions and rename it to ``path``.

    ``path`` is replaced if it is a file; ``tmp`` and ``path`` must be on the same file system (keep
    ``tmp`` in ``path``'s folder). A folder ``path`` that exists must be moved aside first
    (:func:`atomic_dir` does that).
    """
    os.chmod(tmp, default_mode(is_dir=stat.S_ISDIR(os.stat(tmp).st_mode)))
    os.replace(tmp, path)


def _parent(path: str | os.PathLike, parents: bool) -> pathlib.Path:
    path = pathlib.Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write '{path}': folder '{path.parent}' does not exist; create it first")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, parents: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path`` (replacing it).

    The temporary name is hidden (``.<stem>.<random>.tmp<suffix>``) and keeps ``path``'s suffix, so
    writers that pick a format by extension (matplotlib's ``savefig``) still work; the writer may write
    to it or replace it. On an exception the temporary file is removed and ``path`` is left untouched.
    ``parents=True`` creates missing parent folders; with ``False`` a missing folder raises
    ``FileNotFoundError``.

    Example::

        with atomic_file("out/cache.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = _parent(path, parents)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, parents: bool = True) -> Iterator[pathlib.Path]:
    """Yield a fresh, empty temporary folder beside ``path``; on success it replaces ``path``.

    An existing ``path`` is moved aside (to ``.<name>.old``) first and deleted only after the new folder
    is in place, so at every moment either the old or the new complete folder exists under ``path`` (or
    its ``.old`` name). On an exception the temporary folder is removed and ``path`` is left untouched.
    ``parents`` as in :func:`atomic_file`.
    """
    path = _parent(path, parents)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        publish(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, parents: bool = True) -> pathlib.Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; returns ``path`` as a Path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}; use atomic_write_text for str")
    with atomic_file(path, parents=parents) as tmp:
        tmp.write_bytes(data)
    return pathlib.Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      parents: bool = True) -> pathlib.Path:
    """Write ``text`` to ``path`` (in ``encoding``) through :func:`atomic_file`; returns ``path`` as a Path."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}; use atomic_write_bytes for bytes")
    with atomic_file(path, parents=parents) as tmp:
        tmp.write_text(text, encoding=encoding)
    return pathlib.Path(path)
