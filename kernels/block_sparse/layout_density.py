"""Mean density of a block layout in one launch: the fraction of (query, key) token pairs it keeps, as a
0-dim fp32 tensor on the layout's device, without a host sync.

The pattern cache records it for every build it makes (``PatternCache.stats()["mean_density"]``), inside
the search time it reports, and picks this launch where Triton runs. In PyTorch
(:func:`dit_sparse.cache.mean_density_torch`, the reference and the path without Triton) it is about 14
small launches on ``[B, H, Mq]`` tensors - on an H200 a few microseconds each, comparable with the select
launch of a top-k build at Wan-480p (0.06 ms). ``_kept_pairs_kernel`` is one program that walks the rows
in chunks and writes the density.

Counting: every kept key block has ``block_kv`` tokens except the tail block, which a row keeps iff its
last listed index is ``Mk - 1`` (indices are ascending); each row weighs its query block's true size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import BlockLayout

from ._common import broadcast_strides, interpreting

__all__ = ["mean_density_triton"]

_ROWS_PER_STEP = 1024


@triton.jit
def _kept_pairs_kernel(
    counts_ptr, indices_ptr, out_ptr,
    H, Mq, Mk, rows, block_q, block_kv, tail_q, tail_kv, pairs,
    scb, sch, scm, sib, sih, sim,
    BLOCK: tl.constexpr,
):
    kept = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, rows, BLOCK):
        r = (start + tl.arange(0, BLOCK)).to(tl.int64)  # offsets below reach B*H*Mq*Mk
        live = r < rows
        m = r % Mq
        bh = r // Mq
        b = bh // H
        h = bh % H
        count = tl.load(counts_ptr + b * scb + h * sch + m * scm, mask=live, other=0)
        has = count > 0
        last = tl.load(indices_ptr + b * sib + h * sih + m * sim + (count - 1), mask=live & has, other=0)
        cols = count.to(tl.int64) * block_kv - tl.where(has & (last == Mk - 1), block_kv - tail_kv, 0)
        rows_q = tl.where(m == Mq - 1, tail_q, block_q)
        kept += cols * rows_q
    total = tl.sum(kept, axis=0)
    tl.store(out_ptr, (total.to(tl.float64) / pairs).to(tl.float32))


def mean_density_triton(layout: BlockLayout) -> torch.Tensor:
    """``mean_density_torch`` in one Triton launch (CUDA, or the interpreter on CPU)."""
    counts, indices = layout.kv_counts, layout.kv_indices
    if indices.stride(-1) != 1:
        indices = indices.contiguous()
    b, h, mq = counts.shape
    mk = layout.num_kv_blocks
    out = torch.empty((), device=counts.device, dtype=torch.float32)
    cs, is_ = broadcast_strides(counts), broadcast_strides(indices)
    pairs = float(layout.batch * layout.heads * layout.q_len * layout.kv_len)
    _kept_pairs_kernel[(1,)](
        counts, indices, out, h, mq, mk, b * h * mq, layout.block_q, layout.block_kv,
        layout.q_len - layout.block_q * (mq - 1), layout.kv_len - layout.block_kv * (mk - 1), pairs,
        cs[0], cs[1], cs[2], is_[0], is_[1], is_[2],
        BLOCK=_ROWS_PER_STEP if not interpreting() else 64,
    )
    return out
