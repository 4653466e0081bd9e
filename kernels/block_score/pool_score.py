"""Triton kernels and launchers for block scoring: mean-pool token blocks, then score pooled queries
against (centred) pooled keys.

Two small kernels instead of one: pooling reads the ``[B, H, S, D]`` inputs once (the only O(S) work),
and scoring works on the tiny ``[B, H, M, D]`` pooled tensors. Accumulation is fp32 whatever the input
dtype. The dot product uses IEEE fp32 (not TF32) because scores feed top-k selection and tests compare
them with the fp32 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pool_tile", "mean_pool_triton", "pooled_scores_triton", "block_scores_triton"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def block_means_tile(
    x_ptr, S, D, H, M, BLOCK,
    stride_b, stride_h, stride_s, stride_d,
    BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """fp32 means ``[BM, BD]`` of BM consecutive blocks of one (batch, head) - the program's ids
    ``(block tile, batch*head)`` - and the block numbers ``[BM]``: a ``[BM, BT, BD]`` tile summed per step (BT
    rows of each block), then divided by each block's true length (the tail block is shorter). Blocks past
    M read nothing and come out 0. The pooling kernels here and in ``topk_layout.py`` store it."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    blocks = i_m * BM + tl.arange(0, BM)
    starts = blocks * BLOCK
    ends = tl.minimum(starts + BLOCK, S)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    base = x_ptr + i_b * stride_b + i_h * stride_h
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for off in range(0, BLOCK, BT):
        rows = starts[:, None] + off + offs_t[None, :]  # [BM, BT]
        row_ok = (rows < ends[:, None]) & (blocks[:, None] < M)
        ptrs = base + rows[:, :, None].to(tl.int64) * stride_s + offs_d[None, None, :] * stride_d
        mask = row_ok[:, :, None] & (offs_d[None, None, :] < D)
        acc += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), axis=1)
    lengths = tl.maximum(ends - starts, 1).to(tl.float32)
    return acc / lengths[:, None], blocks


@triton.jit
def _mean_pool_kernel(
    x_ptr, out_ptr,
    S, D, H, M, BLOCK,
    stride_b, stride_h, stride_s, stride_d,
    BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    # One program per (BM consecutive blocks, batch*head); out[bh, m, d].
    means, blocks = block_means_tile(x_ptr, S, D, H, M, BLOCK, stride_b, stride_h, stride_s, stride_d, BM, BT, BD)
    offs_d = tl.arange(0, BD)
    out = out_ptr + (tl.program_id(1).to(tl.int64) * M + blocks[:, None]) * D + offs_d[None, :]
    tl.store(out, means, mask=(blocks[:, None] < M) & (offs_d[None, :] < D))


@triton.jit
def _pooled_score_kernel(
    qp_ptr, kp_ptr, kmean_ptr, out_ptr,
    Mq, Mk, D, scale,
    CENTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # One program per (BM query blocks, BN key blocks, batch*head) tile of the score matrix.
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_m = i_m * BM + tl.arange(0, BM)
    offs_n = i_n * BN + tl.arange(0, BN)
    q_base = qp_ptr + i_bh * Mq * D
    k_base = kp_ptr + i_bh * Mk * D
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BK):
        offs_k = d0 + tl.arange(0, BK)
        d_ok = offs_k < D
        q = tl.load(q_base + offs_m[:, None] * D + offs_k[None, :],
                    mask=(offs_m[:, None] < Mq) & d_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_n[:, None] * D + offs_k[None, :],
                    mask=(offs_n[:, None] < Mk) & d_ok[None, :], other=0.0)
        if CENTER:
            k = k - tl.load(kmean_ptr + i_bh * D + offs_k, mask=d_ok, other=0.0)[None, :]
        acc += tl.dot(q, tl.trans(k), input_precision="ieee")
    out = out_ptr + i_bh * Mq * Mk + offs_m[:, None] * Mk + offs_n[None, :]
    tl.store(out, acc * scale, mask=(offs_m[:, None] < Mq) & (offs_n[None, :] < Mk))


def pool_tile(block: int, num_blocks: int, bd: int) -> tuple[int, int]:
    """``(BM, BT)`` of the pooling kernels' ``[BM blocks, BT rows, BD dims]`` step: up to 128 rows of a block
    at a time, and several blocks per program when blocks are short (fewer programs, same bytes read), in
    a tile of at most 16K elements (4 warps).

    Measured on an H200 (``bench_topk_build.py --sweep``, 2026-11-30; q and k of 128-token blocks, D=128):
    a whole 128-row block per step read 2415 GB/s at Wan-480p and 3254 GB/s at Hunyuan-720p, against
    2280 / 2703 GB/s for 64 rows; 8 warps, or several blocks per program, were slower."""
    bt = max(1, min(triton.next_power_of_2(block), 16384 // bd, 128))
    bm = max(1, min(triton.next_power_of_2(num_blocks), 16384 // (bd * bt), 64))
    return bm, bt


def mean_pool_triton(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` consecutive tokens: ``[B, H, S, D]`` (any strides) -> fp32
    ``[B, H, M, D]`` contiguous, ``M = ceil(S / block)``; the tail block is averaged over its length."""
    b, h, s, d = x.shape
    m = _cdiv(s, block)
    out = torch.empty(b, h, m, d, device=x.device, dtype=torch.float32)
    bd = triton.next_power_of_2(d)
    bm, bt = pool_tile(block, m, bd)
    _mean_pool_kernel[(_cdiv(m, bm), b * h)](
        x, out, s, d, h, m, block, *x.stride(), BM=bm, BT=bt, BD=bd,
    )
    return out


def pooled_scores_triton(
    q_pooled: torch.Tensor, k_pooled: torch.Tensor, k_mean: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``scale * q_pooled . (k_pooled - k_mean)``: fp32 contiguous ``[B, H, Mq, D]``, ``[B, H, Mk, D]``,
    ``[B, H, D]`` (or None: no centring) -> fp32 ``[B, H, Mq, Mk]``."""
    b, h, mq, d = q_pooled.shape
    mk = k_pooled.shape[2]
    out = torch.empty(b, h, mq, mk, device=q_pooled.device, dtype=torch.float32)
    bm = bn = max(16, min(64, triton.next_power_of_2(max(mq, mk))))
    bk = max(16, min(64, triton.next_power_of_2(d)))
    grid = (_cdiv(mq, bm), _cdiv(mk, bn), b * h)
    center = k_mean is not None
    _pooled_score_kernel[grid](
        q_pooled, k_pooled, k_mean if center else q_pooled, out, mq, mk, d, float(scale),
        CENTER=center, BM=bm, BN=bn, BK=bk,
    )
    return out


def block_scores_triton(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, scale: float, center_keys: bool
) -> torch.Tensor:
    """fp32 ``[B, H, Mq, Mk]`` pooled logits; see :func:`dit_sparse.kernels.block_score.block_scores`."""
    q_pooled = mean_pool_triton(q, block_q)
    k_pooled = mean_pool_triton(k, block_kv)
    k_mean = None
    if center_keys:
        # The mean over all keys, from the block means weighted by block length (tiny: [B, H, Mk, D]).
        s = k.shape[2]
        lengths = torch.full((k_pooled.shape[2], 1), float(block_kv), device=k.device)
        lengths[-1] = s - block_kv * (k_pooled.shape[2] - 1)
        k_mean = ((k_pooled * lengths).sum(2) / s).contiguous()
    return pooled_scores_triton(q_pooled, k_pooled, k_mean, scale)
