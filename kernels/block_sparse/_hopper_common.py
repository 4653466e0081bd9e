"""What the warp-specialised Gluon kernels for Hopper (``hopper_fwd.py``, ``hopper_dq.py``, ``hopper_dkdv.py``)
share: the Gluon imports (absent from older triton builds, in which case every call takes the Triton kernels),
the launch geometry, which inputs they take, 4-D TMA descriptors, a launch's layout arguments
(:func:`layout_args`) and the jit helpers that read them and view tiles.

Geometry common to all of them: 128x128 layout blocks, head dim 128, 12 warps in three partitions - two
4-warp consumer warpgroups and a 1-warp TMA producer. The launch gives every warp ``MAXNREG`` registers
(12 x 32 x 168 = 64K, the register file) and ``setmaxnreg`` then moves them to 240 + 240 + 24.
"""

from __future__ import annotations

import functools
import os

import torch

from ._common import broadcast_strides, interpreting, tma_addressable
from .layout_ops import cached_work_order

__all__ = [
    "HAVE_GLUON", "BLOCK", "HEAD_DIM", "hopper_supported", "hopper_bwd_supported", "layout_args", "tma_descriptor",
]

BLOCK = 128
HEAD_DIM = 128
CONSUMER_WARPS = 4
PRODUCER_REGS = 24
CONSUMER_REGS = 240
MAXNREG = 168

try:  # Gluon ships with triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False


def hopper_supported(tensors, block_q: int, block_kv: int, switch: str, capability=None) -> bool:
    """Whether a Hopper kernel can run on ``tensors`` (the ``[B, H, S, D]`` inputs, q first, k second).

    Needs Gluon, a CUDA device of compute capability 9.x (``capability`` overrides the query, for tests),
    fp16 / bf16, head dim 128, 128x128 blocks, non-empty sequences, and tensors TMA can address in place
    (16-byte aligned bases and strides, last dim contiguous). The environment variable ``switch`` set to
    ``0`` turns the kernel off; so does the CPU interpreter.
    """
    if not HAVE_GLUON or interpreting() or os.environ.get(switch, "1") == "0":
        return False
    q, k = tensors[0], tensors[1]
    if capability is None:
        if q.device.type != "cuda":
            return False
        capability = torch.cuda.get_device_capability(q.device)
    if capability[0] != 9 or block_q != BLOCK or block_kv != BLOCK:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != HEAD_DIM:
        return False
    if min(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) == 0:
        return False
    return all(t.dtype == q.dtype and tma_addressable(t) for t in tensors)


def hopper_bwd_supported(q, k, v, do, block_q: int, block_kv: int, capability=None) -> bool:
    """Whether the Hopper backward kernels (``hopper_dkdv.py`` and ``hopper_dq.py``, which take the same
    inputs) can run, else the Triton ones do: see :func:`hopper_supported`. ``DIT_SPARSE_HOPPER_BWD=0``
    turns them off."""
    return hopper_supported((q, k, v, do), block_q, block_kv, "DIT_SPARSE_HOPPER_BWD", capability)


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int, bf16: bool):
    """The shared-memory layout of a ``[1, 1, rows, cols]`` TMA block: computing it takes longer than the
    rest of a descriptor (15 of 27 us on a CI core), and a forward + backward builds 15 descriptors."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], gl.bfloat16 if bf16 else gl.float16)


def tma_descriptor(t: torch.Tensor, rows: int):
    """4-D TMA descriptor over ``t`` (``[B, H, S, D]``, any TMA-addressable strides), block ``[1, 1, rows, D]``.
    A size-1 dim's stride is never stepped over; it is replaced by an aligned one (TMA checks every stride)."""
    block = [1, 1, rows, t.shape[-1]]
    layout = _smem_layout(rows, t.shape[-1], t.dtype == torch.bfloat16)
    filler = 16 // t.element_size()
    strides = [s if n > 1 else filler for n, s in zip(t.shape, t.stride())]
    strides[-1] = 1
    return TensorDescriptor(t, list(t.shape), strides, block, layout)


def layout_args(counts: torch.Tensor, indices: torch.Tensor, order: torch.Tensor | None = None):
    """A launch's layout arguments, the host side of :func:`cta_block_list`: the counts, index-list and
    work-order tensors, and their batch / head / block strides (size-1 dims as 0). ``order`` defaults to
    :func:`.layout_ops.cached_work_order` of ``counts`` (longest list first)."""
    if order is None:
        order = cached_work_order(counts)
    strides = (*broadcast_strides(counts), *broadcast_strides(indices)[:3], *broadcast_strides(order))
    return (counts, indices, order), strides


if HAVE_GLUON:

    @gluon.jit
    def as_2d(buf, ROWS: gl.constexpr, COLS: gl.constexpr):
        """A ``[1, 1, ROWS, COLS]`` shared tile (4-D TMA block) as the ``[ROWS, COLS]`` matrix wgmma reads."""
        return buf.reshape([ROWS, COLS])

    @gluon.jit
    def release(bar):
        """Consumer -> producer "buffer free". The arrive is issued by one thread of the partition, so every
        warp of the partition must be past its wgmma wait first."""
        gl.thread_barrier()
        mbarrier.arrive(bar, count=1)

    @gluon.jit
    def cta_block_list(counts_ptr, idx_ptr, order_ptr, H, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
                       stride_im, stride_wb, stride_wh, stride_wm, BLOCK: gl.constexpr):
        """This CTA's place in a ``(blocks, B*H)`` grid over a layout (forward or transposed): ``b``, ``h``,
        ``b*H + h``, the first row of its block, its list's count and a pointer to the list. The block is the
        ``program_id(0)``-th entry of ``order`` for this (batch, head) - :func:`.layout_ops.work_order`, longest
        lists first - so the hardware starts the long CTAs first and the short ones fill the last wave."""
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        blk = gl.load(order_ptr + b.to(gl.int64) * stride_wb + h * stride_wh + pid * stride_wm)
        count = gl.load(counts_ptr + b.to(gl.int64) * stride_cb + h * stride_ch + blk * stride_cm)
        my_idx = idx_ptr + b.to(gl.int64) * stride_ib + h * stride_ih + blk * stride_im
        return b, h, bh, blk * BLOCK, count, my_idx
