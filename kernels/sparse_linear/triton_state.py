"""Per-block linear-attention states in Triton: ``phi(X_j)^T (w_j * Y_j)`` and ``sum phi(X_j) * u_j``.

For every block j of ``block`` consecutive tokens (the last one may be short):

* ``Hs[j] = sum_{s in j} phi(x_s)^T (w_s y_s)``  fp32 ``[D, D]``
* ``Zs[j] = sum_{s in j} phi(x_s) u_s``          fp32 ``[D]``

with optional per-token weights w, u (1 when not given). The forward uses it with (X, Y) = (K, V) for the
key-block states ``H_j, z_j``; the backward with (X, Y, w, u) = (Q, dO_linear, 1/den, d den) for the
query-block gradients ``dR_i, dr_i``. Totals over all blocks are a ``torch.sum`` of the stored blocks, so
"total minus some blocks" cancels exactly the values that were added.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv

from ..block_sparse._common import bhs_strides
from .triton_common import phi_fwd, pick_configs, prune_tiles

__all__ = ["block_states", "complement_states"]

_STATE_CONFIGS = pick_configs(
    [
        # Best of a sweep at Wan-480p (H200, 2026-11-30): bf16 MMA (64, 128, 8 warps, 1 stage) 0.164 ms,
        # tf32 (64, 128, 4, 2) 0.294 ms; 64-wide column slices for head dims of 64.
        triton.Config({"BLOCK_N": 64, "BLOCK_DV": 128}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_N": 64, "BLOCK_DV": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_DV": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=2),
    ],
    triton.Config({"BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_STATE_CONFIGS, key=["D", "BLOCK_KV", "FEATURE_MAP", "HAS_WEIGHTS", "LOWP_DOT"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _block_state_kernel(
    X, Y, W, U, Hs, Zs,
    stride_xb, stride_xh, stride_xs,
    stride_yb, stride_yh, stride_ys,
    H, S, D, M,
    BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, FEATURE_MAP: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = bh // H
    h = bh % H
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    y_base = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh

    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    if EVEN_D:
        d_mask = offs_d < BLOCK_D
        e_mask = offs_e < BLOCK_D
    else:
        d_mask = offs_d < D
        e_mask = offs_e < D

    h_acc = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, BLOCK_KV, BLOCK_N):
        offs_n = blk * BLOCK_KV + n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        x = tl.load(x_base + offs_n[:, None] * stride_xs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        y = tl.load(y_base + offs_n[:, None] * stride_ys + offs_e[None, :],
                    mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        fx = phi_fwd(x.to(tl.float32), n_mask[:, None] & d_mask[None, :], FEATURE_MAP)
        if HAS_WEIGHTS:
            w = tl.load(W + bh.to(tl.int64) * S + offs_n, mask=n_mask, other=0.0)
            u = tl.load(U + bh.to(tl.int64) * S + offs_n, mask=n_mask, other=0.0)
            y = y.to(tl.float32) * w[:, None]
            z_acc += tl.sum(fx * u[:, None], 0)
        else:
            z_acc += tl.sum(fx, 0)
        if LOWP_DOT:  # bf16 operands, fp32 accumulation: the tensor-core rate instead of tf32's half
            h_acc += tl.dot(tl.trans(fx.to(y.dtype)), y)
        else:
            h_acc += tl.dot(tl.trans(fx), y.to(tl.float32))

    state = (bh.to(tl.int64) * M + blk) * D
    tl.store(Hs + state * D + offs_d[:, None] * D + offs_e[None, :], h_acc.to(Hs.dtype.element_ty),
             mask=d_mask[:, None] & e_mask[None, :])
    if pid_e == 0:
        tl.store(Zs + state + offs_d, z_acc, mask=d_mask)


def lowp_dot(y: torch.Tensor, has_weights: bool) -> bool:
    """Whether the state MMA takes bf16 operands: for unweighted bf16 inputs (the forward's K / V), whose
    states are stored in bf16 anyway; phi(x) is rounded to bf16 once, the sum stays fp32. Weighted
    products (the backward's ``dO / den``) and fp16 / fp32 inputs keep the fp32 (tf32) MMA."""
    return y.dtype == torch.bfloat16 and not has_weights


def block_states(
    x: torch.Tensor,
    y: torch.Tensor,
    block: int,
    feature_map_id: int,
    w: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block states and their totals.

    x, y ``[B, H, S, D]`` (last dim contiguous); w, u fp32 ``[B, H, S]`` contiguous, both or neither ->
    ``(Hs [B*H, M, D, D], Zs [B*H, M, D], Htot [B*H, D, D], Ztot [B*H, D])``, ``M = ceil(S / block)``.
    Hs is stored in ``state_dtype`` (accumulated in fp32 either way), the rest in fp32. The totals are
    fp32 sums of the stored Hs, so subtracting stored blocks from them cancels exactly.
    """
    b, h, s, d = x.shape
    m = cdiv(s, block)
    hs = torch.empty(b * h, m, d, d, device=x.device, dtype=state_dtype)
    zs = torch.empty(b * h, m, d, device=x.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(d)
    has_w = w is not None
    if has_w != (u is not None):
        raise ValueError("block_states takes both weights w and u or neither")

    def grid(meta):
        return (m, b * h, triton.cdiv(d, meta["BLOCK_DV"]))

    _block_state_kernel[grid](
        x, y, w if has_w else hs, u if has_w else hs, hs, zs,
        *bhs_strides(x, y),
        h, s, d, m,
        BLOCK_KV=block, BLOCK_D=block_d, EVEN_D=block_d == d, FEATURE_MAP=feature_map_id, HAS_WEIGHTS=has_w,
        LOWP_DOT=lowp_dot(y, has_w),
    )
    return hs, zs, hs.sum(1, dtype=torch.float32), zs.sum(1)


_COMPLEMENT_CONFIGS = pick_configs(
    [triton.Config({"BLOCK_F": 2048}, num_warps=4), triton.Config({"BLOCK_F": 1024}, num_warps=4)],
    triton.Config({"BLOCK_F": 2048}, num_warps=4),
)


@triton.autotune(configs=_COMPLEMENT_CONFIGS, key=["F"])
@triton.jit
def _complement_kernel(
    TOT, S, OUT, COUNTS, INDICES,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, M_SRC, M_OUT, F,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = offs < F
    bh64 = bh.to(tl.int64)
    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + row * stride_cm)
    idx_base = INDICES + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + row * stride_im
    acc = tl.load(TOT + bh64 * F + offs, mask=ok, other=0.0)
    for t in range(0, count):
        j = tl.load(idx_base + t)
        acc -= tl.load(S + (bh64 * M_SRC + j) * F + offs, mask=ok, other=0.0).to(tl.float32)
    acc = tl.where(count < M_SRC, acc, 0.0)
    tl.store(OUT + (bh64 * M_OUT + row) * F + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def complement_states(
    total: torch.Tensor,
    states: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Per row i of a block layout, the total minus the states of the blocks row i lists:
    ``out[bh, i] = total[bh] - sum_{t < counts[i]} states[bh, indices[i, t]]``, summed in fp32, and 0 for a
    row that lists every block (nothing is left over).

    total fp32 ``[B*H, *S]``; states ``[B*H, M_src, *S]`` (contiguous); counts int32 ``[B, H, M_out]`` and
    indices int32 ``[B, H, M_out, M_src]`` (any strides, expanded views too) ->
    ``[B*H, M_out, *S]`` in ``out_dtype``. Each program walks one row's list for one slice of the state,
    so the many independent programs keep the loads in flight (the lists are short: the critical blocks).
    """
    b, h, m_out = counts.shape
    m_src = states.shape[1]
    feat = math.prod(states.shape[2:])
    out = torch.empty(b * h, m_out, *states.shape[2:], device=states.device, dtype=out_dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (m_out, b * h, triton.cdiv(feat, meta["BLOCK_F"]))

    _complement_kernel[grid](
        total, states, out, counts, indices,
        *bhs_strides(counts, indices),
        h, m_src, m_out, feat,
    )
    return out
