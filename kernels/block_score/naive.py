"""Plain fp32 PyTorch reference for :func:`dit_sparse.kernels.block_score.block_scores` (readable, slow)."""

from __future__ import annotations

import math

import torch

__all__ = ["naive_block_scores"]


def naive_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int = 128,
    block_kv: int = 128,
    scale: float | None = None,
    center_keys: bool = True,
) -> torch.Tensor:
    """Pooled block logits, one block at a time.

    q: ``[B, H, Sq, D]``, k: ``[B, H, Sk, D]`` -> fp32 ``[B, H, Mq, Mk]`` with
    ``out[..., i, j] = scale * mean(q block i) . (mean(k block j) - mean(all keys))``; the tail block is
    averaged over its true length.
    """
    q, k = q.float(), k.float()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q_pooled = torch.stack([q[:, :, s : s + block_q].mean(2) for s in range(0, q.shape[2], block_q)], dim=2)
    k_pooled = torch.stack([k[:, :, s : s + block_kv].mean(2) for s in range(0, k.shape[2], block_kv)], dim=2)
    if center_keys:
        k_pooled = k_pooled - k.mean(2, keepdim=True)
    return scale * (q_pooled @ k_pooled.transpose(-1, -2))
