"""Shared constants and helpers of the block-sparse attention kernels (supported sizes, tuning mode,
whether Hopper TMA descriptors may be used).

Kept apart from the kernels so the public API can validate inputs without importing Triton.
"""

from __future__ import annotations

import copy
import functools
import os

import torch

SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width a head dim is computed at (96 -> 128, masked loads)."""
    return 64 if head_dim <= 64 else 128


def new_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Allocate a kernel output. Tests replace this with a NaN-filled allocator to catch unwritten tiles.

    With ``shape=None`` the result has ``like``'s shape and, where ``like`` is dense, its strides, so an
    output follows the memory format of the input (a ``[B, S, H, D]`` buffer seen as ``[B, H, S, D]``
    stays so, which makes the caller's transpose back free).
    """
    if shape is None:
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


@functools.lru_cache(maxsize=None)
def _smem_optin(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin)


def shared_memory_limit(t: torch.Tensor) -> int | None:
    """Bytes of shared memory one program may use on ``t``'s GPU (the opt-in maximum: 227 KB on Hopper,
    163 KB on A100, 99 KB on Ada); None off CUDA (the interpreter has no limit)."""
    if t.device.type != "cuda":
        return None
    return _smem_optin(t.device.index if t.device.index is not None else torch.cuda.current_device())


def fit_shared_memory(config, usage, limit: int | None, shrink: str | None = None):
    """``config`` (a ``triton.Config``) made to fit ``limit`` bytes of shared memory by the estimate
    ``usage(kwargs, num_stages)``: fewer stages first (not below 1), then, if ``shrink`` names a tile
    dimension, that tile halved (not below 16) at 1 stage. The software pipeline keeps a buffer of the
    streamed tiles per stage, so stages cost the most (on an H200 an fp32 forward at head dim 96 with
    128-key tiles and 3 stages asked for 426 KB). The same object if it fits or ``limit`` is None; a config
    that cannot be made to fit is returned as small as it got (the launch then reports the shortage)."""
    kwargs, stages = dict(config.kwargs), config.num_stages
    if limit is not None:
        while stages > 1 and usage(kwargs, stages) > limit:
            stages -= 1
        while shrink is not None and kwargs[shrink] > 16 and usage(kwargs, stages) > limit:
            kwargs[shrink] //= 2
    if stages == config.num_stages and kwargs == config.kwargs:
        return config
    fitted = copy.copy(config)
    fitted.kwargs, fitted.num_stages = kwargs, stages
    return fitted


def broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a ``[B, H, ...]`` layout / tensor with size-1 broadcast dims reported as 0."""
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def bhs_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Batch, head and row strides of each ``[B, H, S, ...]`` tensor, one tensor after another: the stride
    arguments of the kernels' launches."""
    return tuple(stride for t in tensors for stride in t.stride()[:3])


def tma_ready(wanted: bool, *tensors: torch.Tensor) -> bool:
    """Whether a launch reads ``tensors`` through TMA: ``wanted`` (the launch has rows to read) and
    :func:`tma_eligible`; if so, Triton's scratch allocator for in-kernel descriptors is set up."""
    ready = wanted and tma_eligible(*tensors)
    if ready:
        ensure_tma_allocator(tensors[0].device)
    return ready


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read these ``[B, H, S, D]`` tensors through TMA tensor descriptors.

    TMA needs a GPU of compute capability >= 9 (Hopper) and, per (batch, head), a 16-byte aligned base
    and 16-byte aligned row strides. The CPU interpreter emulates descriptors, so it qualifies too.
    Anything else takes the pointer path (same results).
    """
    if not tensors:
        return False
    dev = tensors[0].device
    if dev.type == "cuda":
        if torch.cuda.get_device_capability(dev)[0] < 9:
            return False
    elif not interpreting():
        return False
    return all(tma_addressable(t) for t in tensors)


def tma_addressable(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``t`` in place: last dim contiguous, 16-byte aligned base and
    positive 16-byte aligned strides (dims of size 1 are never stepped over, so their strides do not count;
    a broadcast dim - stride 0, as in the gradient of ``(o * w).sum()`` - is not addressable)."""
    item = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(stride > 0 and (stride * item) % 16 == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator(device: torch.device) -> None:
    """Give Triton a scratch allocator (in-kernel TMA descriptors live in global memory) unless one is set."""
    if device.type != "cuda":
        return
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
