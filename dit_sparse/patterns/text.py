"""Always-on text for MM-DiT / text-in-sequence models (CogVideoX, HunyuanVideo, Flux): blocks holding
text tokens attend to everything (text rows) and are attended by everything (text columns).

Text tokens sit in their own trailing blocks in tile order (:mod:`dit_sparse.layout`); the one block
that may mix the last video tokens with the first text tokens counts as text.
"""

from __future__ import annotations

import torch

from ..block_layout import BlockLayout
from .base import Pattern, PatternContext

__all__ = ["TextAlwaysOn"]


class TextAlwaysOn(Pattern):
    """Dense rows and columns for text blocks; layout ``[1, 1, Mq, Mk]`` (empty when ``text_len == 0``)."""

    @property
    def name(self) -> str:
        return "text_always_on"

    def _build(self, ctx: PatternContext, q=None, k=None) -> BlockLayout:
        return ctx.layout_from_mask(self._mask(ctx))

    def _mask(self, ctx: PatternContext, q=None, k=None) -> torch.Tensor:
        q_text, k_text = ctx.q_coords.is_text, ctx.kv_coords.is_text
        return (q_text[:, None] | k_text[None, :])[None, None]
