"""Layout tensors as the kernels take them, and the transposed layout the dK/dV kernel walks.

:func:`transpose_layout_tensors` computes ``(q_counts [B, H, Mk], q_indices [B, H, Mk, Mq])`` from the
forward lists with a cumsum + scatter (no sort), so it costs a few passes over ``B*H*Mq*Mk`` bytes and
traces under ``torch.compile``. :func:`cached_transpose` memoises it per ``kv_indices`` tensor in eager
mode, so a layout reused across denoising steps or training iterations is transposed once.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["transpose_layout_tensors", "cached_transpose"]


def transpose_layout_tensors(
    kv_counts: torch.Tensor, kv_indices: torch.Tensor, num_q_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block, the ascending list of query blocks that attend to it.

    Args:
        kv_counts: int32 ``[B, H, Mq]``; kv_indices: int32 ``[B, H, Mq, Mk]`` (ascending, padded).
        num_q_blocks: ``Mq``.

    Returns:
        ``q_counts`` int32 ``[B, H, Mk]`` and ``q_indices`` int32 ``[B, H, Mk, Mq]`` (padding slots 0),
        both contiguous - the same lists as ``BlockLayout.transpose()``.
    """
    B, H, mq, mk = kv_indices.shape
    if mq != num_q_blocks:
        raise ValueError(f"kv_indices has {mq} query blocks, expected {num_q_blocks}")
    dev = kv_indices.device
    slot_ok = torch.arange(mk, device=dev) < kv_counts.unsqueeze(-1)
    # One extra column swallows the padding slots, so they never clear a kept block.
    target = torch.where(slot_ok, kv_indices.long(), torch.full_like(kv_indices, mk, dtype=torch.long))
    mask = torch.zeros(B, H, mq, mk + 1, dtype=torch.bool, device=dev)
    mask.scatter_(-1, target, True)
    mask_t = mask[..., :mk].transpose(-1, -2).contiguous()  # [B, H, Mk, Mq]
    q_counts = mask_t.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(mask_t, dim=-1, dtype=torch.int32) - 1
    pos = torch.where(mask_t, pos, torch.full_like(pos, mq)).long()
    src = torch.arange(mq, device=dev, dtype=torch.int32).expand(B, H, mk, mq)
    q_indices = torch.zeros(B, H, mk, mq + 1, dtype=torch.int32, device=dev)
    q_indices.scatter_(-1, pos, src)
    return q_counts, q_indices[..., :mq].contiguous()


# kv_indices tensor -> ((its version, kv_counts' version), weakref to kv_counts, (q_counts, q_indices)).
# torch's weak dictionary compares keys by identity (a plain WeakKeyDictionary would call Tensor.__eq__).
_CACHE = WeakTensorKeyDictionary()


def cached_transpose(
    kv_counts: torch.Tensor, kv_indices: torch.Tensor, num_q_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transpose_layout_tensors`, remembered per (unmodified) ``kv_indices`` / ``kv_counts`` pair."""
    if torch.compiler.is_compiling():
        return transpose_layout_tensors(kv_counts, kv_indices, num_q_blocks)
    stamp = (kv_indices._version, kv_counts._version)
    hit = _CACHE.get(kv_indices)
    if hit is not None and hit[0] == stamp and hit[1]() is kv_counts:
        return hit[2]
    result = transpose_layout_tensors(kv_counts, kv_indices, num_q_blocks)
    _CACHE[kv_indices] = (stamp, weakref.ref(kv_counts), result)
    return result
