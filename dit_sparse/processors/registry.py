"""The supported model families, looked up by transformer class name."""

from __future__ import annotations

from ._base import Family

__all__ = ["families", "family_of", "supported_transformer_classes"]


def _load() -> tuple[Family, ...]:
    from . import cogvideox, flux, hunyuan_video, ltx, mochi, wan

    return (wan.FAMILY, cogvideox.FAMILY, hunyuan_video.FAMILY, ltx.FAMILY, mochi.FAMILY, flux.FAMILY)


_FAMILIES: tuple[Family, ...] | None = None


def families() -> tuple[Family, ...]:
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _load()
    return _FAMILIES


def supported_transformer_classes() -> list[str]:
    return [c for fam in families() for c in fam.transformer_classes]


def family_of(transformer) -> Family | None:
    """The family of a transformer instance (by its class or a base class name), or ``None``."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for fam in families():
        if names.intersection(fam.transformer_classes):
            return fam
    return None



