"""Dense pattern: every query block keeps every key block (the baseline, and a union member that
switches sparsity off)."""

from __future__ import annotations

import torch

from ..block_layout import BlockLayout
from .base import Pattern, PatternContext

__all__ = ["Dense"]


class Dense(Pattern):
    """All key blocks for every query block; layout ``[1, 1, Mq, Mk]``."""

    @property
    def name(self) -> str:
        return "dense"

    def _build(self, ctx: PatternContext, q=None, k=None) -> BlockLayout:
        return BlockLayout.dense(ctx.seq_len, ctx.seq_len, ctx.block_q, ctx.block_kv, device=ctx.device)

    def _mask(self, ctx: PatternContext, q=None, k=None) -> torch.Tensor:
        return torch.ones(1, 1, ctx.num_q_blocks, ctx.num_kv_blocks, dtype=torch.bool, device=ctx.device)
