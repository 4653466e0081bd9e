"""Turn stats and settings into strict JSON values (reports must load in any JSON reader)."""

from __future__ import annotations

import dataclasses
import enum
import math
import os

import torch

__all__ = ["clean_for_json"]


def clean_for_json(value):
    """Recursively convert ``value`` to JSON-safe types: NaN and infinities become ``None`` (JSON has
    neither), tensors and numpy values become numbers or lists, paths and dtypes become strings."""
    if isinstance(value, dict):
        return {str(k): clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [clean_for_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return clean_for_json(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return clean_for_json(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return clean_for_json(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return clean_for_json(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
