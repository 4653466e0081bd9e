"""Triton backward of sparse-linear attention: dq per query tile, then dk / dv per key tile.

Gradient of the linear branch, for query row t of query block i with ``f = phi(q_t)``,
``R_i = Htot - sum_{j crit} H_j``, ``r_i = ztot - sum_{j crit} z_j``, ``den = max(f . r_i, 0) + eps``
and ``o = f R_i / den``::

    dnum = g / den,   dden = -(g . o) / den   (0 where f . r_i <= 0)
    df   = R_i dnum + dden r_i                       -> dq through phi
    dR_i = sum_t f^T dnum,   dr_i = sum_t dden f     (per query block, fp32)
    dH_j = sum_{i: j not crit} dR_i = dRtot - sum_{i: j crit} dR_i   (same for dz_j)
    dphi(k_s) = dH_j v_s + dz_j,   dv_s += phi(k_s) dH_j            -> dk through phi

Launches (the states H_j / z_j are recomputed by ``block_states``, not kept from the forward: SLA is
fine-tuned through many layers, and [Mk, D, D] per head and layer would dominate activation memory):

1. ``_sla_bwd_dq_kernel`` - per query tile: the linear dq (also storing ``1/den`` and ``dden`` per row),
   then ``delta = rowsum(dO_sparse * O_sparse)`` and the FA2 dq loop over the critical blocks.
2. ``block_states(Q, dO_linear, w=1/den, u=dden)`` - dR_i / dr_i per query block and their totals.
3. ``_sla_bwd_lin_kv_kernel`` - per key tile of key block j: dH_j / dz_j from the transposed layout (the
   query blocks that list j), then the linear dk / dv, written to dk / dv.
4. ``_sla_bwd_dkdv_kernel`` - per key tile: the FA2 dk / dv loop over the query blocks that list j, added
   to the values of (3). Kept apart from (3) because together they need more shared memory than an H100/H200 SM has.

Query blocks with every key block critical have a zero linear output and contribute nothing; key blocks
critical for every query block get dH_j = 0 without summing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import BlockLayout, cdiv

from .triton_common import phi_bwd, phi_fwd, pick_configs, prune_tiles
from .triton_fwd import LOG2E, state_dtype
from .triton_state import block_states

__all__ = ["sla_backward"]

_DQ_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_DV": 64}, num_warps=8, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_DQ_CONFIGS, key=["D", "BLOCK_Q", "BLOCK_KV", "FEATURE_MAP"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _sla_bwd_dq_kernel(
    Q, K, V, Os, DOs, DOl, Lse, Delta, Inv, Dden, Counts, Indices, Hs, Zs, Htot, Ztot, DQ,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_gb, stride_gh, stride_gs,
    stride_lb, stride_lh, stride_ls,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, Sq, Sk, D, Mk, scale_log2, scale, eps,
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
    dq_ptrs = DQ + bh64 * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    count = tl.load(Counts + b * stride_cb + h * stride_ch + qblk * stride_cm)
    idx_base = Indices + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qblk * stride_im

    # ---- linear part. Its dq goes to DQ now and is added back at the end: nothing of it stays live
    # through the sparse loop (keeps the kernel free of register spills).
    lin_on = count < Mk
    n_sub = tl.where(lin_on, count, 0)
    x = tl.load(q_ptrs, mask=md_mask, other=0.0).to(tl.float32)
    f = phi_fwd(x, md_mask, FEATURE_MAP)
    state_base = bh64 * Mk
    r = tl.load(Ztot + bh64 * D + offs_d, mask=d_mask, other=0.0)
    for t in range(0, n_sub):
        kblk = tl.load(idx_base + t)
        r -= tl.load(Zs + (state_base + kblk) * D + offs_d, mask=d_mask, other=0.0)
    den_raw = tl.sum(f * r[None, :], 1)
    inv = tl.where(lin_on, 1.0, 0.0) / (tl.maximum(den_raw, 0.0) + eps)

    gl_base = DOl + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # g R^T, summed over column chunks of R
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
        g = tl.load(gl_base + offs_m[:, None] * stride_ls + offs_e[None, :],
                    mask=m_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        a += tl.dot(g, tl.trans(rst))
    # g . o = g . (f R) / den = (f . (g R^T)) / den
    dden = tl.where(den_raw > 0.0, -tl.sum(f * a, 1) * inv * inv, 0.0)
    df = a * inv[:, None] + dden[:, None] * r[None, :]
    tl.store(Inv + bh64 * Sq + offs_m, inv, mask=m_mask)
    tl.store(Dden + bh64 * Sq + offs_m, dden, mask=m_mask)
    tl.store(dq_ptrs, phi_bwd(x, f, df, md_mask, FEATURE_MAP).to(DQ.dtype.element_ty), mask=md_mask)

    # ---- sparse part (FA2 dq)
    q = tl.load(q_ptrs, mask=md_mask, other=0.0)
    gs_base = DOs + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    do = tl.load(gs_base + offs_m[:, None] * stride_gs + offs_d[None, :], mask=md_mask, other=0.0)
    o = tl.load(Os + bh64 * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh64 * Sq + offs_m, delta, mask=m_mask)
    lse = tl.load(Lse + bh64 * Sq + offs_m, mask=m_mask, other=0.0)

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    SUB: tl.constexpr = BLOCK_KV // BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, count * SUB):
        kblk = tl.load(idx_base + it // SUB)
        offs_n = kblk * BLOCK_KV + (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Sk
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=nd_mask, other=0.0)
        # Masked before exp2: past the sequence end k is 0 and 0 - lse may overflow.
        p = tl.exp2(tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k)
    tl.debug_barrier()  # the linear dq stored above must be visible to every thread of the program
    dq = acc * scale + tl.load(dq_ptrs, mask=md_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=md_mask)


_LIN_KV_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=8, num_stages=1),
    ],
    triton.Config({"BLOCK_N": 64, "BLOCK_DV": 64}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_LIN_KV_CONFIGS, key=["D", "BLOCK_Q", "BLOCK_KV", "FEATURE_MAP"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _sla_bwd_lin_kv_kernel(
    K, V, CountsT, IndicesT, DRq, Drq, DRtot, Drtot, DK, DV,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    H, Sk, D, Mq,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    FEATURE_MAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Linear-branch dk / dv of one key tile, written to DK / DV (the sparse kernel adds to them)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    kblk = pid_n * BLOCK_N // BLOCK_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Sk
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_mask = offs_d < BLOCK_D
    else:
        d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    xk = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=nd_mask, other=0.0).to(tl.float32)
    fk = phi_fwd(xk, nd_mask, FEATURE_MAP)
    count = tl.load(CountsT + b * stride_cb + h * stride_ch + kblk * stride_cn)
    idx_base = IndicesT + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + kblk * stride_in

    # dH_j = dRtot - sum of dR_i over the query blocks i that list j as critical (0 if all do).
    lin_on = count < Mq
    n_sub = tl.where(lin_on, count, 0)
    on = tl.where(lin_on, 1.0, 0.0)
    d_z = tl.load(Drtot + bh64 * D + offs_d, mask=d_mask, other=0.0)
    for t in range(0, n_sub):
        qblk = tl.load(idx_base + t)
        d_z -= tl.load(Drq + (bh64 * Mq + qblk) * D + offs_d, mask=d_mask, other=0.0)
    d_fk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32) + (d_z * on)[None, :]
    out_rows = bh64 * Sk * D + offs_n[:, None] * D
    for e0 in tl.static_range(0, BLOCK_D, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        if EVEN_D:
            e_mask = offs_e < BLOCK_D
        else:
            e_mask = offs_e < D
        de_mask = d_mask[:, None] & e_mask[None, :]
        de_off = offs_d[:, None] * D + offs_e[None, :]
        d_h = tl.load(DRtot + bh64 * D * D + de_off, mask=de_mask, other=0.0)
        for t in range(0, n_sub):
            qblk = tl.load(idx_base + t)
            d_h -= tl.load(DRq + (bh64 * Mq + qblk) * D * D + de_off, mask=de_mask, other=0.0)
        d_h = d_h * on
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_e[None, :],
                    mask=n_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        d_fk += tl.dot(v, tl.trans(d_h))
        tl.store(DV + out_rows + offs_e[None, :], tl.dot(fk, d_h).to(DV.dtype.element_ty),
                 mask=n_mask[:, None] & e_mask[None, :])
    tl.store(DK + out_rows + offs_d[None, :], phi_bwd(xk, fk, d_fk, nd_mask, FEATURE_MAP).to(DK.dtype.element_ty),
             mask=nd_mask)


_DKDV_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1),
)


# restore_value: the kernel adds to DK / DV, so every autotuning trial must start from the same values.
@triton.autotune(configs=_DKDV_CONFIGS, key=["D", "BLOCK_Q", "BLOCK_KV"],
                 prune_configs_by={"early_config_prune": prune_tiles}, restore_value=["DK", "DV"])
@triton.jit
def _sla_bwd_dkdv_kernel(
    Q, K, V, DOs, Lse, Delta, CountsT, IndicesT, DK, DV,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_gb, stride_gh, stride_gs,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    H, Sq, Sk, D, scale_log2, scale,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sparse-branch (FA2) dk / dv of one key tile, added to the linear-branch values in DK / DV."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    kblk = pid_n * BLOCK_N // BLOCK_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Sk
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_mask = offs_d < BLOCK_D
    else:
        d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_ks
                + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vs
                + offs_d[None, :], mask=nd_mask, other=0.0)
    count = tl.load(CountsT + b * stride_cb + h * stride_ch + kblk * stride_cn)
    idx_base = IndicesT + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + kblk * stride_in

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    g_base = DOs + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for it in range(0, count * SUB):
        qblk = tl.load(idx_base + it // SUB)
        offs_m = qblk * BLOCK_Q + (it % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(g_base + offs_m[:, None] * stride_gs + offs_d[None, :], mask=md_mask, other=0.0)
        lse = tl.load(Lse + bh64 * Sq + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(Delta + bh64 * Sq + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :]
        p_t = tl.exp2(tl.where(n_mask[:, None] & m_mask[None, :], s_t, float("-inf")))
        dv_acc += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk_acc += tl.dot(ds_t.to(q.dtype), q)

    out = bh64 * Sk * D + offs_n[:, None] * D + offs_d[None, :]
    dk = dk_acc * scale + tl.load(DK + out, mask=nd_mask, other=0.0).to(tl.float32)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=nd_mask)
    dv = dv_acc + tl.load(DV + out, mask=nd_mask, other=0.0).to(tl.float32)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=nd_mask)


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
    returned by ``sla_forward``, layout tensors as for ``sla_forward`` -> ``(dq, dk, dv)``, contiguous, in
    the dtype and shape of q / k / v.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mq, mk = cdiv(sq, block_q), cdiv(sk, block_kv)
    block_d = triton.next_power_of_2(d)
    even_d = block_d == d
    counts = kv_counts.expand(b, h, mq)
    indices = kv_indices.expand(b, h, mq, mk)
    transposed = BlockLayout(kv_counts, kv_indices, sq, sk, block_q, block_kv).transpose().expand(b, h)

    hs, zs, htot, ztot = block_states(k, v, block_kv, feature_map_id, state_dtype=state_dtype(q.dtype))
    dq = torch.empty(b, h, sq, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, h, sk, d, device=k.device, dtype=k.dtype)
    dv = torch.empty(b, h, sk, d, device=v.device, dtype=v.dtype)
    delta = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    inv = torch.empty_like(delta)
    dden = torch.empty_like(delta)

    def grid_q(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

    _sla_bwd_dq_kernel[grid_q](
        q, k, v, o_s, do_s, do_l, lse, delta, inv, dden, counts, indices, hs, zs, htot, ztot, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do_s.stride(0), do_s.stride(1), do_s.stride(2),
        do_l.stride(0), do_l.stride(1), do_l.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        h, sq, sk, d, mk, scale * LOG2E, scale, eps,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, EVEN_D=even_d, FEATURE_MAP=feature_map_id,
    )
    # dR_i = phi(Q_i)^T (dO_linear_i / den), dr_i = phi(Q_i)^T dden, per query block, and their totals.
    d_rq, d_zq, d_rtot, d_ztot = block_states(q, do_l, block_q, feature_map_id, w=inv, u=dden)

    counts_t, indices_t = transposed.kv_counts, transposed.kv_indices

    def grid_kv(meta):
        return (triton.cdiv(sk, meta["BLOCK_N"]), b * h)

    layout_strides = (
        counts_t.stride(0), counts_t.stride(1), counts_t.stride(2),
        indices_t.stride(0), indices_t.stride(1), indices_t.stride(2),
    )
    _sla_bwd_lin_kv_kernel[grid_kv](
        k, v, counts_t, indices_t, d_rq, d_zq, d_rtot, d_ztot, dk, dv,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *layout_strides,
        h, sk, d, mq,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, EVEN_D=even_d, FEATURE_MAP=feature_map_id,
    )
    _sla_bwd_dkdv_kernel[grid_kv](
        q, k, v, do_s, lse, delta, counts_t, indices_t, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do_s.stride(0), do_s.stride(1), do_s.stride(2),
        *layout_strides,
        h, sq, sk, d, scale * LOG2E, scale,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, EVEN_D=even_d,
    )
    return dq, dk, dv
