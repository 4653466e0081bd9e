"""Layout tensors as the kernels take them: the transposed layout the dK/dV kernel walks, the order in
which the Hopper kernels take their blocks, and whether a layout keeps every key block (the forward's
compile-time full-row path).

:func:`transpose_layout_tensors` computes ``(q_counts [B, H, Mk], q_indices [B, H, Mk, Mq])`` from the
forward lists with a cumsum + scatter (no sort), so it costs a few passes over ``B*H*Mq*Mk`` bytes and
traces under ``torch.compile``. :func:`cached_transpose` memoises it per ``kv_indices`` tensor in eager
mode, so a layout reused across denoising steps or training iterations is transposed once.

:func:`work_order` lists each (batch, head)'s blocks longest list first, the order in which the Hopper
kernels' CTAs take them (longest-processing-time-first: the short CTAs fill the last wave instead of a long
one running alone at the end); :func:`cached_work_order` memoises it the same way.

:func:`full_rows_hint` says whether every query block of a layout keeps all key blocks, without a host
sync: the first call per ``kv_counts`` tensor starts an asynchronous device-to-host copy of the answer and
returns ``False`` (the general path, always correct); later calls return the answer once it has arrived.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["transpose_layout_tensors", "cached_transpose", "work_order", "cached_work_order", "full_rows_hint"]


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
    """:func:`transpose_layout_tensors`, remembered per (unmodified) ``kv_indices`` / ``kv_counts`` pair.

    Not while a CUDA graph is being captured: there the result is computed in the graph (a cached tensor read
    by a graph could be freed when its entry is replaced, and one made during capture holds data only once
    the graph replays)."""
    if torch.compiler.is_compiling() or _capturing(kv_indices):
        return transpose_layout_tensors(kv_counts, kv_indices, num_q_blocks)
    stamp = (kv_indices._version, kv_counts._version)
    hit = _CACHE.get(kv_indices)
    if hit is not None and hit[0] == stamp and hit[1]() is kv_counts:
        return hit[2]
    result = transpose_layout_tensors(kv_counts, kv_indices, num_q_blocks)
    _CACHE[kv_indices] = (stamp, weakref.ref(kv_counts), result)
    return result


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Block indices of every (batch, head) row of ``counts`` (int32 ``[B|1, H|1, M]``, any strides), the
    longest list first and equal lists in ascending block order (so a uniform layout keeps the natural
    order): int32, contiguous, shaped like ``counts``. A kernel's CTA ``i`` of a row takes block
    ``order[..., i]``."""
    return torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32)


# counts tensor -> (its version, work_order(counts)).
_ORDER = WeakTensorKeyDictionary()


def cached_work_order(counts: torch.Tensor) -> torch.Tensor:
    """:func:`work_order`, remembered per (unmodified) ``counts`` tensor: a layout reused across denoising
    steps or training iterations is sorted once. Computed afresh while compiling, while a CUDA graph is being
    captured (as :func:`cached_transpose`) and for inference tensors (no version counter)."""
    if torch.compiler.is_compiling() or counts.is_inference() or _capturing(counts):
        return work_order(counts)
    hit = _ORDER.get(counts)
    if hit is not None and hit[0] == counts._version:
        return hit[1]
    order = work_order(counts)
    _ORDER[counts] = (counts._version, order)
    return order


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor and its device's current stream is capturing a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# kv_counts tensor -> [(its version, Mk), host answer (0-dim bool tensor), CUDA event or None, resolved bool|None].
_FULL = WeakTensorKeyDictionary()


def full_rows_hint(kv_counts: torch.Tensor, num_kv_blocks: int) -> bool:
    """True once it is known that every entry of ``kv_counts`` (int32 ``[B, H, Mq]``) equals ``num_kv_blocks``.

    Never blocks the host: the first call for a tensor (or after an in-place edit) queues the check on the
    tensor's device and answers ``False``; a later call answers from the copied result when it is ready.
    ``False`` is always safe (the kernel then reads the index lists), so while a CUDA graph is being
    captured only an already known answer is used, and tensors made under ``torch.inference_mode`` (no
    version counter, so an in-place edit could not be noticed) always get ``False``.
    """
    if kv_counts.is_inference():
        return False
    stamp = (kv_counts._version, num_kv_blocks)
    entry = _FULL.get(kv_counts)
    if entry is not None and entry[0] == stamp:
        if entry[3] is None and (entry[2] is None or _ready(entry[2])):
            entry[3] = bool(entry[1])
        return bool(entry[3])
    if _capturing(kv_counts):
        return False
    flag = (kv_counts == num_kv_blocks).all()
    if kv_counts.is_cuda:
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = flag, None
    _FULL[kv_counts] = [stamp, host, event, None]
    return False


def _ready(event) -> bool:
    return not torch.cuda.is_current_stream_capturing() and event.query()
