"""Dynamic top-k block selection from pooled scores: per (batch, head, query block), keep the key blocks
with the highest mean-pooled logits (:func:`dit_sparse.kernels.block_score.block_scores`).

Two rules, exactly one per pattern:

* ``ratio``: keep ``ceil(ratio * Mk)`` key blocks;
* ``threshold``: keep the fewest key blocks whose softmax mass over pooled logits reaches ``threshold``.
  A block stands for all its tokens, so its mass is weighted by its length (``logit + log(length)``):
  the short tail block does not count as much as a full one. ``threshold=1`` keeps every block.

Both keep at least ``min_blocks``.

Two implementations of one selection. With the Triton backend (CUDA tensors, or ``TRITON_INTERPRET=1``)
a build is two launches (:mod:`dit_sparse.kernels.block_score.topk_layout`: pool q and k, then score and
select straight into the layout or mask); otherwise the PyTorch chain (``block_scores``, then
``topk`` / ``sort`` or :meth:`TopK.select`). Both keep the same blocks, up to scores that tie within
fp32 rounding (the fused path skips the key-mean centring, which shifts each row's logits by a constant
and so changes no selection, and breaks exact ties by the lower block index).
"""

from __future__ import annotations

import math

import torch

from ..block_layout import BlockLayout, cdiv
from .base import Pattern, PatternContext

__all__ = ["TopK", "check_rule", "keep_rule"]


def check_rule(ratio, threshold, min_blocks, who: str = "TopK") -> tuple[float | None, float | None, int]:
    """Validated ``(ratio, threshold, min_blocks)`` of a top-k rule (``who`` names the caller in errors):
    exactly one of ``ratio`` / ``threshold``, a number in (0, 1]; ``min_blocks`` an int >= 1."""
    if (ratio is None) == (threshold is None):
        raise ValueError(f"{who} takes exactly one of ratio= (fraction of key blocks) or threshold= (softmax mass)")
    for what, v in (("ratio", ratio), ("threshold", threshold)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ValueError(f"{who} {what} must be in (0, 1], got {v!r}")
    if not isinstance(min_blocks, int) or isinstance(min_blocks, bool) or min_blocks < 1:
        raise ValueError(f"{who} min_blocks must be an int >= 1, got {min_blocks!r}")
    return (None if ratio is None else float(ratio), None if threshold is None else float(threshold), min_blocks)


def keep_rule(mk: int, ratio, threshold, min_blocks, who: str = "TopK") -> tuple[int, float | None]:
    """The rule over ``mk`` key blocks as ``(n_floor, threshold or None)``: a block is kept iff its rank
    (in order of score) is below ``n_floor``, or (threshold rule) the softmax mass of the blocks before it
    is below ``threshold``. Both :meth:`TopK.select` and the fused kernel
    (:mod:`dit_sparse.kernels.block_score.topk_layout`) select by it."""
    ratio, threshold, min_blocks = check_rule(ratio, threshold, min_blocks, who)
    floor = min(min_blocks, mk)
    if ratio is not None:
        return max(floor, min(mk, math.ceil(ratio * mk))), None
    if threshold >= 1.0:  # every block has some mass: all of it needs all of them
        return mk, None
    return floor, threshold


class TopK(Pattern):
    """Top key blocks per query block and head, by pooled score.

    Args:
        ratio: fraction of key blocks kept, in (0, 1].
        threshold: softmax mass to reach, in (0, 1].
        min_blocks: keep at least this many key blocks (capped by the number of key blocks).
        scale: logit scale for the pooled scores, default ``1 / sqrt(D)``.

    Dynamic: ``build(ctx, q, k)`` with q, k ``[B, H, S, D]`` in tile order; layout ``[B, H, Mq, Mk]``.
    """

    needs_qk = True

    def __init__(self, ratio: float | None = None, threshold: float | None = None, min_blocks: int = 1,
                 scale: float | None = None):
        self.ratio, self.threshold, self.min_blocks = check_rule(ratio, threshold, min_blocks)
        self.scale = scale

    @property
    def name(self) -> str:
        rule = f"r{self.ratio:g}" if self.ratio is not None else f"t{self.threshold:g}"
        return f"topk_{rule}" + (f"_min{self.min_blocks}" if self.min_blocks != 1 else "")

    def _scores(self, ctx: PatternContext, q, k) -> torch.Tensor:
        from ..kernels.block_score import block_scores

        return block_scores(q, k, ctx.block_q, ctx.block_kv, scale=self.scale)  # [B, H, Mq, Mk]

    def _fused(self, ctx: PatternContext, q) -> bool:
        """Whether builds take the fused Triton path (decided from the device and shapes only)."""
        from ..kernels.block_score.topk_layout import fused_topk_supported

        return fused_topk_supported(q, cdiv(ctx.seq_len, ctx.block_kv))

    def _rule(self) -> dict:
        return dict(ratio=self.ratio, threshold=self.threshold, min_blocks=self.min_blocks, scale=self.scale)

    def _mask(self, ctx: PatternContext, q, k) -> torch.Tensor:
        if self._fused(ctx, q):
            from ..kernels.block_score.topk_layout import topk_block_mask

            return topk_block_mask(q, k, ctx.block_q, ctx.block_kv, **self._rule())
        return self.select(self._scores(ctx, q, k), ctx.seq_len, ctx.block_kv)

    def _build(self, ctx: PatternContext, q, k) -> BlockLayout:
        return self._build_fused(ctx, q, k) if self._fused(ctx, q) else self._build_chain(ctx, q, k)

    def _build_fused(self, ctx: PatternContext, q, k) -> BlockLayout:
        """The fused Triton build (``topk_layout``: two launches), which ``_build`` takes where
        ``_fused`` says so; ``scripts/bench_topk_build.py`` times it at every size."""
        from ..kernels.block_score.topk_layout import topk_layout

        counts, indices = topk_layout(q, k, ctx.block_q, ctx.block_kv, **self._rule())
        return BlockLayout(counts, indices, ctx.seq_len, ctx.seq_len, ctx.block_q, ctx.block_kv)

    def _build_chain(self, ctx: PatternContext, q, k) -> BlockLayout:
        """The PyTorch-selection build (``block_scores`` then top-k / select): the path off the Triton
        backend, and the baseline ``scripts/bench_topk_build.py`` times the fused build against."""
        scores = self._scores(ctx, q, k)
        n, threshold = self._keep_rule(scores.shape[-1])
        if threshold is not None:
            return ctx.layout_from_mask(self.select(scores, ctx.seq_len, ctx.block_kv))
        # Ratio rule: every row keeps the same n blocks, so the layout comes straight from top-k's
        # indices (sorted ascending, then zero padding), as from_block_mask_tensor would write it.
        kept = scores.topk(n, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
        indices = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        indices[..., :n] = kept
        counts = torch.full(scores.shape[:-1], n, dtype=torch.int32, device=scores.device)
        return BlockLayout(counts, indices, ctx.seq_len, ctx.seq_len, ctx.block_q, ctx.block_kv)

    def _keep_rule(self, mk: int) -> tuple[int, float | None]:
        return keep_rule(mk, self.ratio, self.threshold, self.min_blocks)

    def select(self, scores: torch.Tensor, kv_len: int, block_kv: int) -> torch.Tensor:
        """bool ``[..., Mq, Mk]`` mask of the key blocks kept from pooled ``scores`` ``[..., Mq, Mk]``."""
        mk = scores.shape[-1]
        if mk != cdiv(kv_len, block_kv):
            raise ValueError(f"scores have {mk} key blocks but kv_len={kv_len}, block_kv={block_kv} needs "
                             f"{cdiv(kv_len, block_kv)}")
        floor, threshold = self._keep_rule(mk)
        if threshold is None:  # ratio rule, or a threshold of 1 (every block carries some mass)
            keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            return keep.scatter_(-1, scores.topk(floor, dim=-1).indices, True)
        # fp64 masses: in fp32 the running sum can reach a threshold near 1 a few blocks early.
        lengths = torch.full((mk,), float(block_kv), device=scores.device, dtype=torch.float64)
        lengths[-1] = kv_len - block_kv * (mk - 1)
        ordered, order = (scores.double() + lengths.log()).sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        count = (mass_before < threshold).sum(-1, keepdim=True).clamp(min=floor)
        ranks = torch.arange(mk, device=scores.device)
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return keep.scatter_(-1, order, ranks < count)
