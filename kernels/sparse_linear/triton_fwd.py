"""Triton forward of sparse-linear attention: key-block states, then one fused kernel per query tile.

1. ``block_states`` (``triton_state.py``) - per key block j: ``H_j = phi(K_j)^T V_j`` (fp32 ``[D, D]``),
   ``z_j = sum phi(K_j)`` (fp32 ``[D]``), and their totals.
2. ``_sla_fwd_kernel`` - per query tile of one layout query block i, in one program:
   (a) online-softmax attention over the critical key blocks -> ``o_sparse`` and the log-sum-exp;
   (b) linear attention over every other block,
   ``phi(Q_i) (Htot - sum_{j crit} H_j) / (max(phi(Q_i) . (ztot - sum_{j crit} z_j), 0) + eps)``,
   summed in fp32 so the subtraction removes exactly the stored values; a query block whose every key
   block is critical gets ``o_linear = 0`` without reading the states.

The log-sum-exp is kept in base 2 (``m + log2 l`` of ``scale * log2(e) * q.k``); query blocks with no
critical block store ``+inf`` there (the backward never reads it: such blocks have no critical keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv

from .triton_common import phi_fwd, pick_configs, prune_tiles
from .triton_state import block_states

__all__ = ["LOG2E", "sla_forward", "state_dtype"]

LOG2E = 1.4426950408889634


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the key-block states H_j: bf16 for bf16 inputs (halves the bytes the linear part
    reads; the states are accumulated in fp32 and their totals summed in fp32 from the stored values, so
    "total minus critical blocks" still cancels exactly), fp32 otherwise (fp16 could overflow: H_j sums
    up to block_kv products)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# ---------------------------------------------------------------------------------------- fused forward
_FWD_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_DV": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "BLOCK_Q", "BLOCK_KV", "FEATURE_MAP"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _sla_fwd_kernel(
    Q, K, V, Counts, Indices, Hs, Zs, Htot, Ztot, Os, Ol, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, Sq, Sk, D, Mk, scale_log2, eps,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    FEATURE_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    qblk = pid_m * BLOCK_M // BLOCK_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Sq
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_mask = offs_d < BLOCK_D
    else:
        d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=md_mask, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    count = tl.load(Counts + b * stride_cb + h * stride_ch + qblk * stride_cm)
    idx_base = Indices + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qblk * stride_im

    # (a) sparse part: online softmax over the critical blocks, in base 2, one flat loop over
    # (critical block, key sub-tile) pairs. m_i starts finite so a sub-tile lying wholly past the
    # sequence end (all scores -inf) leaves the state unchanged instead of producing NaN.
    SUB: tl.constexpr = BLOCK_KV // BLOCK_N
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, count * SUB):
        kblk = tl.load(idx_base + it // SUB)
        offs_n = kblk * BLOCK_KV + (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out_rows = bh64 * Sq * D + offs_m[:, None] * D
    tl.store(Os + out_rows + offs_d[None, :], (acc / l_safe[:, None]).to(Os.dtype.element_ty), mask=md_mask)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("inf"))
    tl.store(Lse + bh64 * Sq + offs_m, lse, mask=m_mask)

    # (b) linear part over the non-critical blocks: totals minus the critical blocks' states, in fp32.
    # q is loaded again rather than kept live through (a): fewer registers, and it comes from L2.
    lin_on = count < Mk
    n_sub = tl.where(lin_on, count, 0)
    f = phi_fwd(tl.load(q_ptrs, mask=md_mask, other=0.0).to(tl.float32), md_mask, FEATURE_MAP)
    state_base = bh64 * Mk
    r = tl.load(Ztot + bh64 * D + offs_d, mask=d_mask, other=0.0)
    for t in range(0, n_sub):
        kblk = tl.load(idx_base + t)
        r -= tl.load(Zs + (state_base + kblk) * D + offs_d, mask=d_mask, other=0.0)
    den = tl.maximum(tl.sum(f * r[None, :], 1), 0.0) + eps
    keep = tl.where(lin_on, 1.0, 0.0) / den
    for e0 in tl.static_range(0, BLOCK_D, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        if EVEN_D:
            e_mask = offs_e < BLOCK_D
        else:
            e_mask = offs_e < D
        de_mask = d_mask[:, None] & e_mask[None, :]
        de_off = offs_d[:, None] * D + offs_e[None, :]
        rst = tl.load(Htot + bh64 * D * D + de_off, mask=de_mask, other=0.0)
        for t in range(0, n_sub):
            kblk = tl.load(idx_base + t)
            rst -= tl.load(Hs + (state_base + kblk) * D * D + de_off, mask=de_mask, other=0.0).to(tl.float32)
        o_lin = tl.dot(f, rst) * keep[:, None]
        tl.store(Ol + out_rows + offs_e[None, :], o_lin.to(Ol.dtype.element_ty),
                 mask=m_mask[:, None] & e_mask[None, :])


def sla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature_map_id: int,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the SLA forward.

    q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]`` (last dim contiguous, one dtype), kv_counts int32
    ``[B|1, H|1, Mq]`` and kv_indices int32 ``[B|1, H|1, Mq, Mk]`` (last dim contiguous) ->
    ``(o_sparse [B, H, Sq, D], o_linear [B, H, Sq, D], lse fp32 [B, H, Sq])`` (lse in base 2).
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mk = cdiv(sk, block_kv)
    kv_counts = kv_counts.expand(b, h, cdiv(sq, block_q))
    kv_indices = kv_indices.expand(b, h, cdiv(sq, block_q), mk)
    block_d = triton.next_power_of_2(d)
    hs, zs, htot, ztot = block_states(k, v, block_kv, feature_map_id, state_dtype=state_dtype(q.dtype))
    o_s = torch.empty(b, h, sq, d, device=q.device, dtype=q.dtype)
    o_l = torch.empty_like(o_s)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

    _sla_fwd_kernel[grid](
        q, k, v, kv_counts, kv_indices, hs, zs, htot, ztot, o_s, o_l, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_counts.stride(0), kv_counts.stride(1), kv_counts.stride(2),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2),
        h, sq, sk, d, mk, scale * LOG2E, eps,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, EVEN_D=block_d == d, FEATURE_MAP=feature_map_id,
    )
    return o_s, o_l, lse

