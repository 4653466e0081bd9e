"""Load a file of ``scripts/`` (not a package) as a module, for the tests of the scripts."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str, register: Callable | None = None):
    """``scripts/<name>.py`` executed as a module named ``name``. ``register(module)`` runs before the
    module's code, e.g. to put it into ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register is not None:
        register(module)
    spec.loader.exec_module(module)
    return module
