"""First-frame attention sink: every query block keeps the key blocks of the first frame(s), which video
DiTs attend to heavily from every frame (the conditioning frame in image-to-video)."""

from __future__ import annotations

import torch

from ..block_layout import BlockLayout
from .base import Pattern, PatternContext

__all__ = ["FirstFrameSink"]


class FirstFrameSink(Pattern):
    """Every query block keeps each key block holding a video token of frame ``< frames``.

    Layout ``[1, 1, Mq, Mk]``. With tiles deeper than one frame a sink block also holds later frames
    of the same tile.
    """

    def __init__(self, frames: int = 1):
        if not isinstance(frames, int) or isinstance(frames, bool) or frames <= 0:
            raise ValueError(f"FirstFrameSink frames must be a positive int, got {frames!r}")
        self.frames = frames

    @property
    def name(self) -> str:
        return f"first_frame_sink_f{self.frames}"

    def _build(self, ctx: PatternContext, q=None, k=None) -> BlockLayout:
        return ctx.layout_from_mask(self._mask(ctx))

    def _mask(self, ctx: PatternContext, q=None, k=None) -> torch.Tensor:
        kc = ctx.kv_coords
        sink = kc.has_video & (kc.t_min < self.frames)
        return sink[None, None, None, :].expand(1, 1, ctx.num_q_blocks, -1)
