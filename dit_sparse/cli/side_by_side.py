"""Put several videos of one size next to each other, each under a caption (for ``dit-sparse compare``)."""

from __future__ import annotations

import numpy as np

__all__ = ["side_by_side", "to_uint8"]

_CAPTION_HEIGHT = 20
_GAP = 4
_MACRO_BLOCK = 16


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float ``[F, H, W, C]`` in ``[0, 1]`` (or uint8) -> uint8 ``[F, H, W, C]``."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _caption(text: str, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, _CAPTION_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(img).text((3, 4), text, fill=(255, 255, 255))
    return np.asarray(img)


def side_by_side(videos: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """Videos ``[F, H, W, 3]`` (same shape) -> one uint8 video ``[F, H', W', 3]``.

    Each video gets its caption in a black strip of 20 pixels above it; a black gap of 4 pixels
    separates them. The result is padded with black to multiples of 16 (what H.264 encoders take without
    rescaling): ``H' = ceil16(20 + H)``, ``W' = ceil16(n*W + (n-1)*4)``.
    """
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    if len(captions) != len(videos):
        raise ValueError(f"got {len(videos)} videos but {len(captions)} captions; give one caption per video")
    shape = videos[0].shape
    for v in videos:
        if v.ndim != 4 or v.shape != shape or v.shape[-1] != 3:
            raise ValueError(f"videos must all be [F, H, W, 3] of one shape; got {v.shape} and {shape}")
    f, h, w, _ = shape
    columns = []
    for i, (v, text) in enumerate(zip(videos, captions)):
        cap = np.broadcast_to(_caption(text, w), (f, _CAPTION_HEIGHT, w, 3))
        columns.append(np.concatenate([cap, to_uint8(v)], axis=1))
        if i < len(videos) - 1:
            columns.append(np.zeros((f, _CAPTION_HEIGHT + h, _GAP, 3), dtype=np.uint8))
    out = np.concatenate(columns, axis=2)
    pad_h, pad_w = -out.shape[1] % _MACRO_BLOCK, -out.shape[2] % _MACRO_BLOCK
    return np.ascontiguousarray(np.pad(out, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))))
