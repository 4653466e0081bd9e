"""Vectorised PyTorch implementation of block scoring: the CPU path when Triton is not available or not
interpreted. Same maths as the Triton kernels (fp32 accumulation, tail block averaged over its length)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mean_pool_torch", "block_scores_torch"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mean_pool_torch(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` consecutive tokens: ``[B, H, S, D]`` -> fp32 ``[B, H, M, D]``."""
    b, h, s, d = x.shape
    m = _cdiv(s, block)
    sums = F.pad(x.float(), (0, 0, 0, m * block - s)).view(b, h, m, block, d).sum(3)
    counts = torch.full((m, 1), float(block), device=x.device)
    counts[-1] = s - block * (m - 1)
    return sums / counts


def block_scores_torch(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: float, center_keys: bool
) -> torch.Tensor:
    """fp32 ``[B, H, Mq, Mk]`` pooled logits; see :func:`dit_sparse.kernels.block_score.block_scores`."""
    q_pooled = mean_pool_torch(q, block_q)
    k_pooled = mean_pool_torch(k, block_kv)
    if center_keys:
        k_pooled = k_pooled - k.float().mean(2, keepdim=True)
    return scale * (q_pooled @ k_pooled.transpose(-1, -2))
