"""Quality and cost of a block layout: density (fraction of token pairs computed) and attention recall
(fraction of the dense softmax mass the layout keeps). Presets are tuned on these two numbers.

Recall is computed a few whole query blocks at a time: memory O(block_q * S) per (batch, head) (a chunk of
at most ~16M logits, at least one block), never O(S^2).
"""

from __future__ import annotations

import math

import torch

from ..block_layout import BlockLayout

__all__ = ["layout_density", "attention_recall"]

# Logits per chunk of query blocks in attention_recall (16 Mi fp32 = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def layout_density(layout: BlockLayout) -> torch.Tensor:
    """Fraction of (query, key) token pairs kept: fp32 ``[B|1, H|1]`` (tail blocks at true size)."""
    return layout.density()


def attention_recall(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Mean over queries of the dense softmax mass inside the kept blocks: fp32 ``[B, H]``.

    q: ``[B, H, q_len, D]``, k: ``[B, H, kv_len, D]``, in the token order the layout was built for (tile
    order). A query row that keeps no block has recall 0; a dense layout has recall 1.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must be [B, H, S, D] with matching B, H; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] != layout.q_len or k.shape[2] != layout.kv_len:
        raise ValueError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {q.shape[2]} and k "
            f"{k.shape[2]} tokens"
        )
    b, h = q.shape[:2]
    blocks = layout.to(q.device).expand(b, h).to_block_mask_tensor()  # [B, H, Mq, Mk]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float()
    key_block = torch.arange(layout.kv_len, device=q.device) // layout.block_kv
    bq = layout.block_q
    # Whole query blocks per chunk, about _CHUNK_ELEMENTS logits at a time (at least one block).
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * bq * layout.kv_len))
    total = torch.zeros(b, h, device=q.device)
    for i in range(0, layout.num_q_blocks, per_chunk):
        rows = slice(i * bq, min((i + per_chunk) * bq, layout.q_len))
        probs = torch.softmax((q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale, dim=-1)  # [B, H, r, S]
        kept = blocks[:, :, i : i + per_chunk][..., key_block]  # [B, H, blocks in chunk, S]
        kept = kept.repeat_interleave(bq, dim=2)[:, :, : probs.shape[2]]
        total += (probs * kept).sum((-1, -2))
    return total / layout.q_len
