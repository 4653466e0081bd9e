"""Softmax mass per key block of a few sampled query rows against all keys, without the ``[B, H, n, S]``
logits in memory: what ``SpatioTemporal`` classifies heads by.

The PyTorch path (``dit_sparse.patterns.spatiotemporal``: ``_sampled_logits`` then
``_block_softmax_mass``, also the reference here) writes the fp32 logits, reads them for the softmax,
writes the probabilities and reads them again for the block sums: at Wan-480p (H=12, 64 rows, 32760 keys)
four passes over 100 MB after the GEMM, where the GEMM itself reads k once (100 MB).

``_block_stats_kernel`` runs one program per (batch*head, key block, chunk of rows): it computes that
``[rows, block]`` tile of ``q_rows @ k^T`` on the tensor cores and writes, per row, the tile's maximum
and its sum of ``exp(logit - max)`` - fp32 ``[B, H, n, Mk]`` each. The mass is then
``exp(m - M) * s / sum over blocks``, with ``M`` the row maximum, on those small tensors. k is read once;
nothing of size ``S`` per row is written.

Numerics: half-precision inputs multiply in fp32 accumulation with the scale folded into the sampled
rows (one rounding of q's dtype), as the PyTorch path; fp32 inputs multiply in IEEE fp32 (no TF32). The
per-block maxima make the exponentials exact where the PyTorch path's global-max softmax is too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv

__all__ = ["sampled_block_mass_triton"]

# Rows of one program (the sampled rows are few: SpatioTemporal's default is 64).
_ROWS = 64


@triton.jit
def _block_stats_kernel(
    q_ptr, k_ptr, m_ptr, s_ptr,
    H, N, S, D, Mk, block,
    sqb, sqh, sqn, sqd, skb, skh, sks, skd,
    BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    j = tl.program_id(1)
    rows = tl.program_id(2) * BN + tl.arange(0, BN)
    b = bh // H
    h = bh % H
    cols = j * block + tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    row_ok = rows < N
    col_ok = (tl.arange(0, BK) < block) & (cols < S)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(k_ptr + b.to(tl.int64) * skb + h * skh + cols[:, None].to(tl.int64) * sks + offs_d[None, :] * skd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        logits = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        logits = tl.dot(q, tl.trans(k))
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    s = tl.sum(tl.exp(logits - m[:, None]), axis=1)
    out = (bh.to(tl.int64) * N + rows) * Mk + j
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)


def sampled_block_mass_triton(q_rows: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """Softmax over ``scale * q_rows @ k^T`` summed per block of ``block`` keys (the tail block shorter):
    ``[B, H, n, D]`` and ``[B, H, S, D]`` (any strides) -> fp32 ``[B, H, n, Mk]``. CUDA tensors, or CPU ones
    under the Triton interpreter."""
    b, h, n, d = q_rows.shape
    s = k.shape[2]
    mk = cdiv(s, block)
    ieee = q_rows.dtype == torch.float32 or k.dtype != q_rows.dtype
    if ieee:  # fp32 (or mixed) inputs: fp32 operands, scaled as the PyTorch path does after the product
        rows, k = q_rows.float() * scale, k.float()
    else:  # the scale folded into the few rows, in their dtype (as the PyTorch path)
        rows = (q_rows.float() * scale).to(q_rows.dtype)
    m = torch.empty(b, h, n, mk, device=k.device, dtype=torch.float32)
    ssum = torch.empty_like(m)
    bn = min(_ROWS, max(16, triton.next_power_of_2(n)))
    _block_stats_kernel[(b * h, mk, cdiv(n, bn))](
        rows, k, m, ssum, h, n, s, d, mk, block, *rows.stride(), *k.stride(),
        BN=bn, BK=max(16, triton.next_power_of_2(block)), BD=max(16, triton.next_power_of_2(d)), IEEE=ieee,
    )
    top = m.amax(-1, keepdim=True)
    weights = torch.exp(m - top) * ssum
    return weights / weights.sum(-1, keepdim=True)
