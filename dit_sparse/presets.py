"""Named speed presets for :class:`~dit_sparse.config.SparseAttentionConfig`.

Each preset is a set of config fields plus a one-line description. ``measured`` holds the speed and
quality numbers of a preset once they are measured: ``dit_sparse/presets_measured.json``, written by
``scripts/record_preset_measurements.py`` from ``benchmarks/e2e.json`` (``scripts/bench_e2e.py``: time
per step and speed-up over dense cuDNN attention, Wan 2.1 1.3B at 480p on a GPU) and
``benchmarks/quality.json`` (``scripts/quality_report.py``: PSNR / SSIM against the dense video) - never
typed in by hand. A preset missing from that file has ``measured = None``.

Presets, from closest-to-dense to fastest::

    dense     our code path with every block kept (a reference; no speed-up)
    quality   wide 3D tile windows, long dense warm-up                       (attention only)
    balanced  3x3x3-tile windows plus top-k blocks, 20% dense warm-up        (attention only)
    fast      3x3x3-tile windows, 10% dense warm-up, then whole transformer blocks computed on every
              2nd step and reused (input + kept residual) in between
    turbo     as fast, but blocks computed on every 3rd step

``fast`` and ``turbo`` combine the two speed levers: sparse attention makes a computing step cheaper,
block-level step caching (``reuse_scope="block"``, ``dit_sparse/block_cache.py``) skips all blocks but
the first and the last on the other steps. Attention-only savings are bounded by attention's share of
a step; block reuse also saves the feed-forward and cross-attention time.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field, replace
from typing import Any

from .config import SparseAttentionConfig

__all__ = ["Preset", "PRESETS", "preset_config", "describe_presets"]


@dataclass(frozen=True)
class Preset:
    """A named config: ``fields`` are :class:`SparseAttentionConfig` keyword arguments.

    ``measured`` is ``None`` until filled from GPU benchmark output (see the module docstring).
    """

    name: str
    description: str
    fields: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "dense",
            "every block kept through dit-sparse's own path: a reference for quality, no speed-up",
            {"mode": "dense", "pattern": "dense", "dense_steps": 0},
        ),
        Preset(
            "quality",
            "wide 5x5x5-tile windows with a first-frame sink and 30% dense warm-up steps",
            {"pattern": "tile3d", "window": (5, 5, 5), "first_frame_sink": 1, "dense_steps": 0.3},
        ),
        Preset(
            "balanced",
            "3x3x3-tile windows plus the top 5% key blocks per query block, 20% dense warm-up steps",
            {"pattern": "tile3d+topk", "window": (3, 3, 3), "topk_ratio": 0.05, "dense_steps": 0.2, "refresh_every": 5},
        ),
        Preset(
            "fast",
            "3x3x3-tile windows, 10% dense warm-up steps; after the warm-up every transformer block but the "
            "first and last computes on every 2nd step and in between returns its input plus the residual "
            "it produced on its last computing step (block reuse)",
            {"pattern": "tile3d", "window": (3, 3, 3), "dense_steps": 0.1, "reuse_scope": "block",
             "reuse_every": 2, "always_compute_blocks": (0, -1)},
        ),
        Preset(
            "turbo",
            "3x3x3-tile windows, 10% dense warm-up steps; after the warm-up every transformer block but the "
            "first and last computes on every 3rd step and in between returns its input plus the residual "
            "it produced on its last computing step (block reuse)",
            {"pattern": "tile3d", "window": (3, 3, 3), "dense_steps": 0.1, "reuse_scope": "block",
             "reuse_every": 3, "always_compute_blocks": (0, -1)},
        ),
    )
}


def _load_measured() -> dict[str, dict[str, Any]]:
    path = pathlib.Path(__file__).with_name("presets_measured.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


for _name, _numbers in _load_measured().items():
    if _name in PRESETS and isinstance(_numbers, dict):
        PRESETS[_name] = replace(PRESETS[_name], measured=dict(_numbers))


def preset_config(name: str, **overrides) -> SparseAttentionConfig:
    """A fresh :class:`SparseAttentionConfig` for preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[name].fields, **overrides}
    fields.setdefault("preset_name", name)
    return SparseAttentionConfig(**fields)


def describe_presets() -> str:
    """One line per preset: ``name: description`` (for ``--help`` texts)."""
    return "\n".join(f"{p.name}: {p.description}" for p in PRESETS.values())
