"""Backward Triton kernels of block-sparse attention (FlashAttention-2 style) and their launcher.

Three kernels:

* ``_bwd_preprocess``: ``delta = rowsum(dO * O) - dLSE`` (fp32 ``[B, H, Sq]``); the ``dLSE`` term makes
  gradients flowing into the returned log-sum-exp exact.
* ``_bwd_dkdv``: one program per ``BLOCK_N1`` keys, looping over the query blocks of the TRANSPOSED
  layout (``q_counts [B, H, Mk]``, ``q_indices [B, H, Mk, Mq]``), accumulating dK and dV in fp32.
* ``_bwd_dq``: one program per ``BLOCK_M2`` queries, looping over the forward layout, accumulating dQ.

Probabilities are recomputed from the saved natural-log LSE (converted to the exp2 domain). Rows with
``lse = -inf`` (query blocks without key blocks) get ``+inf`` instead, so their probabilities are 0 and
their gradients exactly 0. Out-of-range query rows / key rows of tail blocks are loaded as zeros, which
makes their contributions vanish without masking the interior blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, broadcast_strides, interpreting, new_output, padded_head_dim

__all__ = ["block_sparse_bwd", "DKDV_TUNE_SPACE", "DQ_TUNE_SPACE"]

# dK/dV: (BLOCK_N1 keys per program, BLOCK_M1 queries per step, num_warps, num_stages)
_DKDV_GPU_CONFIGS = [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (64, 32, 4, 4)]
# dQ: (BLOCK_M2 queries per program, BLOCK_N2 keys per step, num_warps, num_stages)
_DQ_GPU_CONFIGS = [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (64, 32, 4, 4)]
DKDV_TUNE_SPACE = [(128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3),
                   (128, 64, 4, 2), (64, 64, 8, 2)]
DQ_TUNE_SPACE = [(128, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3),
                 (128, 64, 4, 2), (64, 64, 8, 2)]


def _dkdv_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N1": 64, "BLOCK_M1": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N1": n, "BLOCK_M1": m}, num_warps=w, num_stages=s) for n, m, w, s in _DKDV_GPU_CONFIGS]


def _dq_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M2": 64, "BLOCK_N2": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M2": m, "BLOCK_N2": n}, num_warps=w, num_stages=s) for m, n, w, s in _DQ_GPU_CONFIGS]


def _prune_dkdv(configs, named_args, **kwargs):
    bq, bkv = kwargs["BLOCK_Q"], kwargs["BLOCK_KV"]
    kept = [c for c in configs if c.kwargs["BLOCK_N1"] <= bkv and c.kwargs["BLOCK_M1"] <= bq]
    return kept or configs[:1]


def _prune_dq(configs, named_args, **kwargs):
    bq, bkv = kwargs["BLOCK_Q"], kwargs["BLOCK_KV"]
    kept = [c for c in configs if c.kwargs["BLOCK_M2"] <= bq and c.kwargs["BLOCK_N2"] <= bkv]
    return kept or configs[:1]


@triton.jit
def _bwd_preprocess(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    H, q_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = pid_bh.to(tl.int64) * q_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < q_len, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, q_len,
    stride_qs, stride_dos, qk_scale, offs_m0, offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASK_Q: tl.constexpr,
):
    offs_m = start_m + offs_m0
    qT_ptrs = q_base + offs_m[None, :] * stride_qs + offs_d[:, None]
    do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_d[None, :]
    if MASK_Q:
        row_ok = offs_m < q_len
        qT = tl.load(qT_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        if HEAD_DIM != HEAD_DIM_PAD:
            qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qkT = tl.dot(k, qT)
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.autotune(
    configs=_dkdv_configs(), key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV"], prune_configs_by={"early_config_prune": _prune_dkdv}
)
@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_COUNTS, Q_INDICES,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    H, q_len, kv_len, qk_scale, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, EVEN_Q: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_block = (pid_n * BLOCK_N1) // BLOCK_KV

    offs_n = pid_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_m0 = tl.arange(0, BLOCK_M1)
    kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * q_len
    delta_base = DELTA + pid_bh.to(tl.int64) * q_len

    count = tl.load(Q_COUNTS + b * stride_cb + h * stride_ch + kv_block * stride_cn)
    idx_base = Q_INDICES + b * stride_ib + h * stride_ih + kv_block * stride_in

    dk = tl.zeros([BLOCK_N1, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM_PAD], dtype=tl.float32)

    SUB: tl.constexpr = BLOCK_Q // BLOCK_M1
    n_main = count
    n_tail = 0
    if not EVEN_Q:
        last_block = tl.cdiv(q_len, BLOCK_Q) - 1
        last = tl.load(idx_base + tl.maximum(count - 1, 0))
        n_tail = tl.where((count > 0) & (last == last_block), 1, 0)
        n_main = count - n_tail

    for it in range(0, n_main * SUB):
        blk = tl.load(idx_base + it // SUB)
        start_m = tl.multiple_of(blk * BLOCK_Q + (it % SUB) * BLOCK_M1, BLOCK_M1)
        dk, dv = _dkdv_step(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, q_len, stride_qs, stride_dos, qk_scale,
            offs_m0, offs_d, HEAD_DIM, HEAD_DIM_PAD, False,
        )
    if not EVEN_Q:
        tail_start = (tl.cdiv(q_len, BLOCK_Q) - 1) * BLOCK_Q
        for sub in range(0, n_tail * SUB):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, tail_start + sub * BLOCK_M1, q_len,
                stride_qs, stride_dos, qk_scale, offs_m0, offs_d, HEAD_DIM, HEAD_DIM_PAD, True,
            )

    dk *= scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, start_n, kv_len, stride_ks, stride_vs, qk_scale, offs_n0, offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASK_KV: tl.constexpr,
):
    offs_n = start_n + offs_n0
    kT_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
    vT_ptrs = v_base + offs_n[None, :] * stride_vs + offs_d[:, None]
    if MASK_KV:
        m = (offs_n[None, :] < kv_len) & (offs_d[:, None] < HEAD_DIM)
        kT = tl.load(kT_ptrs, mask=m, other=0.0)
        vT = tl.load(vT_ptrs, mask=m, other=0.0)
    else:
        if HEAD_DIM != HEAD_DIM_PAD:
            kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
    qk = tl.dot(q, kT)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    dp = tl.dot(do, vT)
    ds = p * (dp - delta[:, None])
    # Zero-loaded tail keys give zero rows of K, so their (nonzero) ds adds nothing to dQ.
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.autotune(
    configs=_dq_configs(), key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV"], prune_configs_by={"early_config_prune": _prune_dq}
)
@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNTS, KV_INDICES,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, q_len, kv_len, qk_scale, scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, EVEN_KV: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_block = (pid_m * BLOCK_M2) // BLOCK_Q

    offs_m = pid_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n0 = tl.arange(0, BLOCK_N2)
    row_ok = offs_m < q_len
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    count = tl.load(KV_COUNTS + b * stride_cb + h * stride_ch + q_block * stride_cm)
    idx_base = KV_INDICES + b * stride_ib + h * stride_ih + q_block * stride_im

    dq = tl.zeros([BLOCK_M2, HEAD_DIM_PAD], dtype=tl.float32)
    SUB: tl.constexpr = BLOCK_KV // BLOCK_N2
    n_main = count
    n_tail = 0
    if not EVEN_KV:
        last_block = tl.cdiv(kv_len, BLOCK_KV) - 1
        last = tl.load(idx_base + tl.maximum(count - 1, 0))
        n_tail = tl.where((count > 0) & (last == last_block), 1, 0)
        n_main = count - n_tail

    for it in range(0, n_main * SUB):
        blk = tl.load(idx_base + it // SUB)
        start_n = tl.multiple_of(blk * BLOCK_KV + (it % SUB) * BLOCK_N2, BLOCK_N2)
        dq = _dq_step(
            dq, q, do, lse2, delta, k_base, v_base, start_n, kv_len, stride_ks, stride_vs, qk_scale, offs_n0, offs_d,
            HEAD_DIM, HEAD_DIM_PAD, False,
        )
    if not EVEN_KV:
        tail_start = (tl.cdiv(kv_len, BLOCK_KV) - 1) * BLOCK_KV
        for sub in range(0, n_tail * SUB):
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, tail_start + sub * BLOCK_N2, kv_len, stride_ks, stride_vs,
                qk_scale, offs_n0, offs_d, HEAD_DIM, HEAD_DIM_PAD, True,
            )

    dq *= scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def block_sparse_bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: torch.Tensor,
    q_indices: torch.Tensor,
    scale: float,
    block_q: int,
    block_kv: int,
    dkdv_config: tuple[int, int, int, int] | None = None,
    dq_config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels on validated inputs.

    Args:
        do, o: ``[B, H, Sq, D]``; dlse: fp32 ``[B, H, Sq]`` or None; q ``[B, H, Sq, D]``; k, v
        ``[B, H, Skv, D]``; lse fp32 ``[B, H, Sq]`` from the forward (all last dims contiguous).
        kv_counts / kv_indices: the forward layout ``[B|1, H|1, Mq]`` / ``[B|1, H|1, Mq, Mk]``.
        q_counts / q_indices: the transposed layout ``[B|1, H|1, Mk]`` / ``[B|1, H|1, Mk, Mq]``.
        dkdv_config: ``(BLOCK_N1, BLOCK_M1, num_warps, num_stages)``; dq_config:
        ``(BLOCK_M2, BLOCK_N2, num_warps, num_stages)`` - bypass the autotuner (benchmark sweeps).

    Returns:
        ``dq``, ``dk``, ``dv`` shaped (and, where dense, strided) like q, k, v.
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    dq, dk, dv = new_output(q), new_output(k), new_output(v)
    if B * H == 0 or (Sq == 0 and Skv == 0):
        return dq, dk, dv
    d_pad = padded_head_dim(D)
    delta = new_output(q, (B, H, Sq), torch.float32)
    if Sq:
        _bwd_preprocess[(triton.cdiv(Sq, 128), B * H)](
            o, do, dlse if dlse is not None else delta, delta,
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            H, Sq, HEAD_DIM=D, HEAD_DIM_PAD=d_pad, HAS_DLSE=dlse is not None, BLOCK=128,
        )
    qk_scale = scale * LOG2E
    common = dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_Q=block_q, BLOCK_KV=block_kv)

    if Skv:
        qcs, qis = broadcast_strides(q_counts), broadcast_strides(q_indices)
        dkdv_args = (
            q, k, v, do, lse, delta, dk, dv, q_counts, q_indices,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            qcs[0], qcs[1], qcs[2],
            qis[0], qis[1], qis[2],
            H, Sq, Skv, qk_scale, scale,
        )
        dkdv_meta = dict(common, EVEN_Q=Sq % block_q == 0)
        mk = triton.cdiv(Skv, block_kv)
        if dkdv_config is None and interpreting():
            dkdv_config = (block_kv, block_q, 4, 1)  # whole layout blocks: fewer interpreted steps
        if dkdv_config is None:
            grid = lambda meta: (mk * (block_kv // meta["BLOCK_N1"]), B * H)  # noqa: E731
            _bwd_dkdv[grid](*dkdv_args, **dkdv_meta)
        else:
            n1, m1, warps, stages = dkdv_config
            _bwd_dkdv.fn[(mk * (block_kv // n1), B * H)](
                *dkdv_args, **dkdv_meta, BLOCK_N1=n1, BLOCK_M1=m1, num_warps=warps, num_stages=stages
            )

    if Sq:
        kcs, kis = broadcast_strides(kv_counts), broadcast_strides(kv_indices)
        dq_args = (
            q, k, v, do, lse, delta, dq, kv_counts, kv_indices,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            kcs[0], kcs[1], kcs[2],
            kis[0], kis[1], kis[2],
            H, Sq, Skv, qk_scale, scale,
        )
        dq_meta = dict(common, EVEN_KV=Skv % block_kv == 0)
        mq = triton.cdiv(Sq, block_q)
        if dq_config is None and interpreting():
            dq_config = (block_q, block_kv, 4, 1)
        if dq_config is None:
            grid = lambda meta: (mq * (block_q // meta["BLOCK_M2"]), B * H)  # noqa: E731
            _bwd_dq[grid](*dq_args, **dq_meta)
        else:
            m2, n2, warps, stages = dq_config
            _bwd_dq.fn[(mq * (block_q // m2), B * H)](
                *dq_args, **dq_meta, BLOCK_M2=m2, BLOCK_N2=n2, num_warps=warps, num_stages=stages
            )
    return dq, dk, dv
