"""Triton backward of sparse-linear attention: the block-sparse backward for the softmax part, then the
linear part's gradients from per-block states.

Gradient of the linear branch, for query row t of query block i with ``f = phi(q_t)``,
``R_i = Htot - sum_{j crit} H_j``, ``r_i = ztot - sum_{j crit} z_j``, ``den = max(f . r_i, 0) + eps``
and ``o = f R_i / den``::

    dnum = g / den,   dden = -(g . o) / den   (0 where f . r_i <= 0)
    df   = R_i dnum + dden r_i                       -> dq through phi
    dR_i = sum_t f^T dnum,   dr_i = sum_t dden f     (per query block)
    dH_j = sum_{i: j not crit} dR_i = dRtot - sum_{i: j crit} dR_i   (same for dz_j)
    dphi(k_s) = dH_j v_s + dz_j,   dv_s += phi(k_s) dH_j            -> dk through phi

Launches (the states are recomputed, not kept from the forward: SLA is fine-tuned through many layers,
and ``[Mq, D, D]`` per head and layer would dominate activation memory):

1. ``block_sparse_bwd`` - dq / dk / dv of the softmax part over the critical blocks (the tuned
   block-sparse kernels: TMA loads, FA2 split over the transposed layout).
2. ``linear_states`` - ``R_i`` / ``r_i`` per query block, as in the forward.
3. ``_sla_lin_dq_kernel`` - per query block: the linear dq (one MMA, ``g R_i^T``), added to dq; it stores
   ``1/den`` and ``dden`` per row (0 in query blocks whose every key block is critical).
4. ``block_states(Q, dO_linear, w=1/den, u=dden)`` - dR_i / dr_i per query block and their totals, then
   ``complement_states`` over the transposed layout - dH_j / dz_j per key block.
5. ``_sla_lin_dkdv_kernel`` - per key block: the linear dk / dv (two MMAs), added to dk / dv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv

from ..block_sparse._common import bhs_strides, padded_head_dim
from ..block_sparse.layout_ops import cached_transpose
from ..block_sparse.triton_bwd import block_sparse_bwd
from .triton_common import linear_state, phi_bwd, phi_fwd, row_tile
from .triton_fwd import linear_states, state_dtype
from .triton_state import block_states, complement_states

__all__ = ["sla_backward"]


def _num_warps(block: int) -> int:
    return 8 if block >= 128 else 4


def dkdv_rows(block_kv: int, element_size: int) -> int:
    """Key rows per program of the linear dk / dv kernel: the whole key block, except fp32 blocks of 128+
    rows, which take 64 - a 128-row fp32 tile with its [D, D] state asks for 256 KB of shared memory at
    head dim 96 / 128 compiled for sm_90, over the H100 / H200's 227 KB (``tests/kernels/
    _triton_sm90_smem.py sla``)."""
    return min(block_kv, 64) if element_size == 4 else block_kv


@triton.jit
def _sla_lin_dq_kernel(
    Q, DOL, LIN_R, LIN_Z, DQ, INV, DDEN, COUNTS,
    stride_qb, stride_qh, stride_qs,
    stride_gb, stride_gh, stride_gs,
    stride_db, stride_dh, stride_ds,
    stride_cb, stride_ch, stride_cm,
    H, Sq, Mk, eps,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, FEATURE_MAP: tl.constexpr,
):
    """Linear-branch dq of one query block, added to DQ; stores 1/den and dden of its rows."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    valid = m_ok[:, None] & d_ok[None, :]

    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + pid_m * stride_cm)
    lin_on = count < Mk
    x = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    f = phi_fwd(x, valid, FEATURE_MAP)
    rs, r = linear_state(LIN_R, LIN_Z, bh64 * tl.cdiv(Sq, BLOCK_M) + pid_m, offs_d, HEAD_DIM)
    den_raw = tl.sum(f * r[None, :], 1)
    inv = tl.where(lin_on, 1.0, 0.0) / (tl.maximum(den_raw, 0.0) + eps)
    g = tl.load(DOL + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :],
                mask=valid, other=0.0)
    a = tl.dot(g.to(rs.dtype), tl.trans(rs))  # g R^T
    # g . o = g . (f R) / den = (f . (g R^T)) / den
    dden = tl.where(den_raw > 0.0, -tl.sum(f * a, 1) * inv * inv, 0.0)
    df = a * inv[:, None] + dden[:, None] * r[None, :]
    dq_ptrs = DQ + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :]
    dq = tl.load(dq_ptrs, mask=valid, other=0.0).to(tl.float32) + phi_bwd(x, f, df, valid, FEATURE_MAP)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=valid)
    tl.store(INV + bh64 * Sq + offs_m, inv, mask=m_ok)
    tl.store(DDEN + bh64 * Sq + offs_m, dden, mask=m_ok)


@triton.jit
def _sla_lin_dkdv_kernel(
    K, V, DH, DZ, DK, DV,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    H, Sk,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    FEATURE_MAP: tl.constexpr,
):
    """Linear-branch dk / dv of ``ROWS`` rows (a divisor of BLOCK_N, so inside one key block) from their
    key block's dH_j / dz_j (zero when every query block lists it), added to DK / DV."""
    pid_r, bh, b, h, offs_n, offs_d = row_tile(H, ROWS, HEAD_DIM_PAD)
    n_ok = offs_n < Sk
    d_ok = offs_d < HEAD_DIM
    valid = n_ok[:, None] & d_ok[None, :]

    block = bh.to(tl.int64) * tl.cdiv(Sk, BLOCK_N) + (pid_r * ROWS) // BLOCK_N
    d_h, d_z = linear_state(DH, DZ, block, offs_d, HEAD_DIM)
    xk = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                 mask=valid, other=0.0).to(tl.float32)
    fk = phi_fwd(xk, valid, FEATURE_MAP)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=valid, other=0.0)
    d_fk = tl.dot(v.to(d_h.dtype), tl.trans(d_h)) + d_z[None, :]
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    dk = tl.load(dk_ptrs, mask=valid, other=0.0).to(tl.float32) + phi_bwd(xk, fk, d_fk, valid, FEATURE_MAP)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=valid)
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    dv = tl.load(dv_ptrs, mask=valid, other=0.0).to(tl.float32) + tl.dot(fk.to(d_h.dtype), d_h)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=valid)


def sla_backward(
    do_s: torch.Tensor,
    do_l: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_s: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature_map_id: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the SLA backward.

    do_s / do_l / q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]`` (last dims contiguous), o_s and lse as
    returned by ``sla_forward``, layout tensors as for ``sla_forward`` -> ``(dq, dk, dv)`` in the dtype
    and shape of q / k / v.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mq, mk = cdiv(sq, block_q), cdiv(sk, block_kv)
    counts = kv_counts.expand(b, h, mq)
    indices = kv_indices.expand(b, h, mq, mk)
    q_counts, q_indices = cached_transpose(kv_counts, kv_indices, mq)
    dq, dk, dv = block_sparse_bwd(
        do_s, None, q, k, v, o_s, lse, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv,
    )
    if b * h == 0 or sq == 0 or sk == 0:
        return dq, dk, dv
    d_pad = padded_head_dim(d)
    fm = dict(HEAD_DIM=d, HEAD_DIM_PAD=d_pad, FEATURE_MAP=feature_map_id)

    r, z = linear_states(k, v, counts, indices, block_kv, feature_map_id)
    inv = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    dden = torch.empty_like(inv)
    _sla_lin_dq_kernel[(mq, b * h)](
        q, do_l, r, z, dq, inv, dden, counts, *bhs_strides(q, do_l, dq, counts),
        h, sq, mk, eps, BLOCK_M=block_q, **fm, num_warps=_num_warps(block_q),
    )
    del r, z
    # dR_i = phi(Q_i)^T (dO_linear_i / den), dr_i = phi(Q_i)^T dden per query block; dH_j, dz_j their
    # complements over the query blocks that list key block j.
    sd = state_dtype(q.dtype)
    d_rq, d_zq, d_rtot, d_ztot = block_states(q, do_l, block_q, feature_map_id, w=inv, u=dden, state_dtype=sd)
    qc, qi = q_counts.expand(b, h, mk), q_indices.expand(b, h, mk, mq)
    d_h = complement_states(d_rtot, d_rq, qc, qi, sd)
    d_z = complement_states(d_ztot, d_zq, qc, qi, torch.float32)
    del d_rq, d_zq
    rows = dkdv_rows(block_kv, q.element_size())
    _sla_lin_dkdv_kernel[(cdiv(sk, rows), b * h)](
        k, v, d_h, d_z, dk, dv, *bhs_strides(k, v, dk, dv),
        h, sk, BLOCK_N=block_kv, ROWS=rows, **fm, num_warps=_num_warps(rows),
    )
    return dq, dk, dv
