"""``dit-sparse presets``: the speed presets, what each does, and their measured speed and quality.

Numbers come only from the preset table (:data:`dit_sparse.presets.PRESETS`, field ``measured``);
a preset without them shows "not measured". The keys read from ``measured`` are ``speedup`` (end-to-end
speed-up over dense), ``setting`` (where it was measured, e.g. "H200, Wan 2.1 1.3B 480p"), ``psnr_db``
and ``ssim`` (against the dense video); any other keys are listed as ``key=value``.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run", "measured_speedup", "format_presets"]

NOT_MEASURED = "not measured"
_SPEED_KEYS = ("speedup", "setting")
_QUALITY_KEYS = ("psnr_db", "ssim")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "presets",
        help="list the speed presets with their measured speed and quality",
        description="List the speed presets: what each does, measured speed-up and quality vs dense.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(format_presets())
    return 0


def _measured(name: str) -> dict | None:
    from dit_sparse.presets import PRESETS

    preset = PRESETS.get(name)
    return preset.measured if preset is not None and preset.measured else None


def measured_speedup(name: str) -> dict | None:
    """``{"speedup": x, "setting": str|None, "text": "2.10x (H200 ...)"}`` from the preset table, or None."""
    m = _measured(name)
    text = _speedup_text(m)
    if text is None:
        return None
    return {"speedup": float(m["speedup"]), "setting": m.get("setting"), "text": text}


def _speedup_text(m: dict | None) -> str | None:
    if not m or not isinstance(m.get("speedup"), (int, float)):
        return None
    return f"{m['speedup']:.2f}x" + (f" ({m['setting']})" if m.get("setting") else "")


def _speed_text(m: dict | None) -> str:
    return _speedup_text(m) or NOT_MEASURED


def _quality_text(m: dict | None) -> str:
    if not m:
        return NOT_MEASURED
    parts = []
    if isinstance(m.get("psnr_db"), (int, float)):
        parts.append(f"{m['psnr_db']:.1f} dB PSNR")
    if isinstance(m.get("ssim"), (int, float)):
        parts.append(f"SSIM {m['ssim']:.3f}")
    return ", ".join(parts) if parts else NOT_MEASURED


def _other_text(m: dict | None) -> str:
    if not m:
        return ""
    return " ".join(f"{k}={v}" for k, v in m.items() if k not in _SPEED_KEYS + _QUALITY_KEYS)


def format_presets() -> str:
    """The preset table as text: one block per preset (name, what it does, speed, quality)."""
    from dit_sparse.presets import PRESETS

    lines = []
    for p in PRESETS.values():
        m = p.measured or None
        lines.append(f"{p.name}")
        lines.append(f"  what:    {p.description}")
        lines.append(f"  speed:   {_speed_text(m)}")
        lines.append(f"  quality: {_quality_text(m)}")
        other = _other_text(m)
        if other:
            lines.append(f"  also:    {other}")
    return "\n".join(lines)
