"""Backward Triton kernels of block-sparse attention (FlashAttention-2 style) and their launcher.

Three kernels, each writing every element of its outputs with plain stores (no accumulation into
memory, no atomics), so running one twice on the same buffers - as the autotuner does when it times
configs - gives the same result:

* ``_bwd_preprocess``: ``delta = rowsum(dO * O) - dLSE`` (fp32 ``[B, H, Sq]``); the ``dLSE`` term makes
  gradients flowing into the returned log-sum-exp exact.
* ``_bwd_dkdv``: one program per ``BLOCK_N1`` keys, looping over the query blocks of the TRANSPOSED
  layout (``q_counts [B, H, Mk]``, ``q_indices [B, H, Mk, Mq]``), accumulating dK and dV in fp32 registers.
* ``_bwd_dq``: one program per ``BLOCK_M2`` queries, looping over the forward layout, accumulating dQ.

On Hopper, for the inputs they take (fp16 / bf16, head dim 128, 128x128 blocks), the launcher runs the
warp-specialised Gluon kernels of ``hopper_dkdv.py`` and ``hopper_dq.py`` in place of ``_bwd_dkdv`` and
``_bwd_dq`` (the Gluon dK/dV: the same results, 1.4x faster at 5% density and 1.6x dense on an H200). The
Gluon dQ then also computes ``delta`` (from O and the dO tile it loads anyway) and writes it for the dK/dV
kernel, so it runs first and the preprocess is not launched.

The autotuned kernels declare no ``reset_to_zero`` / ``restore_value`` hooks: such a hook runs on the
real arguments, and round 2's ``reset_to_zero=["DQ_ACC"]`` zeroed ``delta`` (passed as that argument when
dQ had its own kernel) after timing, giving wrong dQ / dK on the first call of each autotuner key.

``USE_TMA`` configs read Q / dO (dK/dV kernel) and K / V (dQ kernel) through in-kernel TMA tensor
descriptors when the launcher found the tensors eligible (``TMA_OK``); tail rows and padded head-dim
columns arrive as zeros, so no load masks are needed.

Probabilities are recomputed from the saved natural-log LSE (converted to the exp2 domain). Rows with
``lse = -inf`` (query blocks without key blocks) get ``+inf`` instead, so their probabilities are 0 and
their gradients exactly 0. Out-of-range query rows / key rows of tail blocks are loaded as zeros, which
makes their contributions vanish without masking the interior blocks.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E, bhs_strides, broadcast_strides, fit_shared_memory, interpreting, new_output, padded_head_dim,
    shared_memory_limit, tma_ready,
)
from ..sparse_linear.triton_common import row_tile
from ._hopper_common import hopper_bwd_supported
from .hopper_dkdv import hopper_dkdv
from .hopper_dq import hopper_dq

__all__ = ["block_sparse_bwd", "DkdvConfig", "DqConfig", "DKDV_TUNE_SPACE", "DQ_TUNE_SPACE"]


class DkdvConfig(NamedTuple):
    """dK/dV kernel config: keys per program, queries per step, warps, stages, TMA loads of Q / dO."""

    block_n1: int
    block_m1: int
    num_warps: int
    num_stages: int
    tma: bool = False


class DqConfig(NamedTuple):
    """dQ kernel config: queries per program, keys per step, warps, stages, TMA loads of K / V."""

    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    tma: bool = False


# GPU configs. H200 round 2 (Wan-480p 25%, bf16, whole backward): dK/dV pointer (128, 64, 8, 2) 10.78 ms
# (its TMA twin 10.85); dQ TMA (128, 64, 8, 2) 10.60 ms, pointer 10.86 - the autotuner picks between
# those two where TMA is allowed. The 64-wide entries serve 64-blocks (measured at 128-blocks in round 1-2:
# dK/dV (64, 32, 4, 3) 11.6 ms, dQ (64, 32, 4, 3) 11.9 ms).
_DKDV_GPU_CONFIGS = [DkdvConfig(128, 64, 8, 2), DkdvConfig(64, 32, 4, 3)]
_DQ_GPU_CONFIGS = [DqConfig(128, 64, 8, 2, True), DqConfig(128, 64, 8, 2), DqConfig(64, 32, 4, 3)]
# A few variants around the winners for scripts/bench_kernels.py --tune.
DKDV_TUNE_SPACE = [
    DkdvConfig(128, 64, 8, 2), DkdvConfig(128, 64, 8, 3), DkdvConfig(128, 64, 8, 2, True),
    DkdvConfig(128, 32, 8, 2),
]
DQ_TUNE_SPACE = [
    DqConfig(128, 64, 8, 2, True), DqConfig(128, 64, 8, 2), DqConfig(128, 64, 8, 3, True),
    DqConfig(128, 32, 8, 2, True),
]


def _dkdv_triton(c: DkdvConfig) -> triton.Config:
    return triton.Config({"BLOCK_N1": c.block_n1, "BLOCK_M1": c.block_m1, "USE_TMA": c.tma},
                         num_warps=c.num_warps, num_stages=c.num_stages)


def _dq_triton(c: DqConfig) -> triton.Config:
    return triton.Config({"BLOCK_M2": c.block_m2, "BLOCK_N2": c.block_n2, "USE_TMA": c.tma},
                         num_warps=c.num_warps, num_stages=c.num_stages)


def _dkdv_configs():
    if interpreting():  # several configs need a GPU driver to benchmark; the launcher overrides this one
        return [_dkdv_triton(DkdvConfig(64, 64, 4, 1))]
    return [_dkdv_triton(c) for c in _DKDV_GPU_CONFIGS]


def _dq_configs():
    if interpreting():
        return [_dq_triton(DqConfig(64, 64, 4, 1))]
    return [_dq_triton(c) for c in _DQ_GPU_CONFIGS]


def _prune_dkdv(configs, named_args, **kwargs):
    """Configs with one program per layout key block (``BLOCK_N1 == block_kv``); TMA ones only if allowed."""
    bq, bkv, tma_ok = kwargs["BLOCK_Q"], kwargs["BLOCK_KV"], kwargs["TMA_OK"]
    kept = [c for c in configs if c.kwargs["BLOCK_N1"] == bkv and bq % c.kwargs["BLOCK_M1"] == 0
            and (tma_ok or not c.kwargs["USE_TMA"])]
    if not kept:
        raise ValueError(f"no dK/dV config fits block_q={bq}, block_kv={bkv}; add one to the config list")
    q = named_args["Q"]
    usage = functools.partial(dkdv_shared_memory, row=kwargs["HEAD_DIM_PAD"] * q.element_size(),
                              elem=q.element_size())
    return [fit_shared_memory(c, usage, shared_memory_limit(q), shrink="BLOCK_M1") for c in kept]


def _prune_dq(configs, named_args, **kwargs):
    """Configs with one program per layout query block (``BLOCK_M2 == block_q``); TMA ones only if allowed."""
    bq, bkv, tma_ok = kwargs["BLOCK_Q"], kwargs["BLOCK_KV"], kwargs["TMA_OK"]
    kept = [c for c in configs if c.kwargs["BLOCK_M2"] == bq and bkv % c.kwargs["BLOCK_N2"] == 0
            and (tma_ok or not c.kwargs["USE_TMA"])]
    if not kept:
        raise ValueError(f"no dQ config fits block_q={bq}, block_kv={bkv}; add one to the config list")
    q = named_args["Q"]
    usage = functools.partial(dq_shared_memory, row=kwargs["HEAD_DIM_PAD"] * q.element_size(), elem=q.element_size())
    return [fit_shared_memory(c, usage, shared_memory_limit(q), shrink="BLOCK_N2") for c in kept]


# Shared-memory estimates of the two backward kernels (``row``: bytes of one padded head-dim row, ``elem``:
# bytes per input element), fitted to what the kernels compiled for sm_90 ask (``tests/kernels/
# _triton_sm90_smem.py``, head dim 128): never below it for fp32 / bf16 / fp16, exact or up to 64 KB above.
def dkdv_shared_memory(kw: dict, stages: int, row: int, elem: int) -> int:
    """Q and dO tiles per stage; K and V; fp32 inputs need another Q + dO's worth (e.g. 256 KB at 1 stage
    with 64-query steps, 192 KB with 32)."""
    bm, bn = kw["BLOCK_M1"], kw["BLOCK_N1"]
    return stages * 2 * bm * row + 2 * bn * row + 2 * bm * row * (2 if elem >= 4 else 1)


def dq_shared_memory(kw: dict, stages: int, row: int, elem: int) -> int:
    """K and V tiles per stage; Q and dO; fp32 inputs also an fp32 [BLOCK_M2, BLOCK_N2] tile."""
    bm, bn = kw["BLOCK_M2"], kw["BLOCK_N2"]
    return stages * 2 * bn * row + 2 * bm * row + (bm * bn * 4 if elem >= 4 else 0)


@triton.jit
def _bwd_preprocess(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    H, q_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr,
):
    _, pid_bh, b, h, offs_m, offs_d = row_tile(H, BLOCK, HEAD_DIM_PAD)
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
    dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, start_m, q_len,
    stride_qs, stride_dos, qk_scale, offs_m0, offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASK_Q: tl.constexpr, TMA: tl.constexpr,
):
    offs_m = start_m + offs_m0
    if TMA:
        # Descriptor shape [q_len, HEAD_DIM]: tail rows and padded columns arrive as zeros.
        qT = q_desc.load([start_m, 0]).T
        do = do_desc.load([start_m, 0])
    else:
        qT_ptrs = q_base + offs_m[None, :] * stride_qs + offs_d[:, None]
        do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_d[None, :]
        if MASK_Q:
            row_ok = offs_m < q_len
            qT = tl.load(qT_ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
    if MASK_Q:
        lse = tl.load(lse_base + offs_m, mask=offs_m < q_len, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < q_len, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qkT = tl.dot(k, qT)
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
    dk = tl.dot(dsT, tl.trans(qT), dk)
    return dk, dv


@triton.autotune(
    configs=_dkdv_configs(), key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "TMA_OK"],
    prune_configs_by={"early_config_prune": _prune_dkdv},
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
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, EVEN_Q: tl.constexpr, TMA_OK: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr, USE_TMA: tl.constexpr,
):
    TMA: tl.constexpr = USE_TMA and TMA_OK
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
    if TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[q_len, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M1, HEAD_DIM_PAD])
        do_desc = tl.make_tensor_descriptor(do_base, shape=[q_len, HEAD_DIM], strides=[stride_dos, 1],
                                            block_shape=[BLOCK_M1, HEAD_DIM_PAD])
    else:
        q_desc = q_base
        do_desc = do_base
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
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, start_m, q_len,
            stride_qs, stride_dos, qk_scale, offs_m0, offs_d, HEAD_DIM, HEAD_DIM_PAD, False, TMA,
        )
    if not EVEN_Q:
        tail_start = (tl.cdiv(q_len, BLOCK_Q) - 1) * BLOCK_Q
        for sub in range(0, n_tail * SUB):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base,
                tail_start + sub * BLOCK_M1, q_len, stride_qs, stride_dos, qk_scale, offs_m0, offs_d,
                HEAD_DIM, HEAD_DIM_PAD, True, TMA,
            )

    dk *= scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, start_n, kv_len, stride_ks, stride_vs, qk_scale,
    offs_n0, offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASK_KV: tl.constexpr, TMA: tl.constexpr,
):
    if TMA:
        # Zero rows past kv_len / zero padded columns, as the masked pointer loads give.
        kT = k_desc.load([start_n, 0]).T
        vT = v_desc.load([start_n, 0]).T
    else:
        offs_n = start_n + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
        vT_ptrs = v_base + offs_n[None, :] * stride_vs + offs_d[:, None]
        if MASK_KV:
            m = (offs_n[None, :] < kv_len) & (offs_d[:, None] < HEAD_DIM)
            kT = tl.load(kT_ptrs, mask=m, other=0.0)
            vT = tl.load(vT_ptrs, mask=m, other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
    qk = tl.dot(q, kT)
    if MASK_KV:
        # Keys past kv_len score 0 - which exp2 turns into inf when a row's real scores (its lse) are very
        # negative, and inf * 0 is NaN: mask them out before the exponential.
        qk = tl.where((start_n + offs_n0)[None, :] < kv_len, qk, float("-inf"))
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    dp = tl.dot(do, vT)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.autotune(
    configs=_dq_configs(), key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "TMA_OK"],
    prune_configs_by={"early_config_prune": _prune_dq},
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
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, EVEN_KV: tl.constexpr, TMA_OK: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, USE_TMA: tl.constexpr,
):
    TMA: tl.constexpr = USE_TMA and TMA_OK
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
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N2, HEAD_DIM_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N2, HEAD_DIM_PAD])
    else:
        k_desc = k_base
        v_desc = v_base
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
            dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, start_n, kv_len, stride_ks, stride_vs, qk_scale,
            offs_n0, offs_d, HEAD_DIM, HEAD_DIM_PAD, False, TMA,
        )
    if not EVEN_KV:
        tail_start = (tl.cdiv(kv_len, BLOCK_KV) - 1) * BLOCK_KV
        for sub in range(0, n_tail * SUB):
            dq = _dq_step(
                dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, tail_start + sub * BLOCK_N2, kv_len,
                stride_ks, stride_vs, qk_scale, offs_n0, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, TMA,
            )

    dq *= scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def _interpret_tma() -> bool:
    return os.environ.get("DIT_SPARSE_INTERPRET_TMA") == "1"


def _launch(kernel, config: DkdvConfig | DqConfig | None, args: tuple, meta: dict, blocks: int, block: int,
            bh: int, tiles: tuple[str, str]) -> None:
    """Launch ``_bwd_dkdv`` / ``_bwd_dq`` over ``blocks`` layout blocks of ``block`` rows and ``bh`` batch x
    heads, each program taking a tile of ``tiles[0]`` rows and stepping ``tiles[1]`` rows of the other side:
    through its autotuner, or with ``config`` (those two tiles, warps, stages, TMA) as given."""
    own, step = tiles
    if config is None:
        kernel[lambda m: (blocks * (block // m[own]), bh)](*args, **meta)
    else:
        own_rows, step_rows, num_warps, num_stages, tma = config
        kernel.fn[(blocks * (block // own_rows), bh)](
            *args, **meta, **{own: own_rows, step: step_rows}, USE_TMA=tma, num_warps=num_warps, num_stages=num_stages,
        )


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
    dkdv_config: tuple | None = None,
    dq_config: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on validated inputs.

    Args:
        do, o: ``[B, H, Sq, D]``; dlse: fp32 ``[B, H, Sq]`` or None; q ``[B, H, Sq, D]``; k, v
        ``[B, H, Skv, D]``; lse fp32 ``[B, H, Sq]`` from the forward (all last dims contiguous).
        kv_counts / kv_indices: the forward layout ``[B|1, H|1, Mq]`` / ``[B|1, H|1, Mq, Mk]``.
        q_counts / q_indices: the transposed layout ``[B|1, H|1, Mk]`` / ``[B|1, H|1, Mk, Mq]``.
        dkdv_config: a :class:`DkdvConfig` or tuple ``(BLOCK_N1, BLOCK_M1, num_warps, num_stages[, tma])``;
        dq_config: a :class:`DqConfig` or tuple ``(BLOCK_M2, BLOCK_N2, num_warps, num_stages[, tma])`` -
        bypass the autotuners (benchmark sweeps, tests); a given ``dkdv_config`` / ``dq_config`` also runs the
        Triton kernel where the Hopper one would apply.

    Returns:
        ``dq``, ``dk``, ``dv`` shaped (and, where dense, strided) like q, k, v.
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    if B * H == 0 or (Sq == 0 and Skv == 0):
        return new_output(q), new_output(k), new_output(v)
    d_pad = padded_head_dim(D)
    delta = new_output(q, (B, H, Sq), torch.float32)
    hopper = hopper_bwd_supported(q, k, v, do, block_q, block_kv)  # both Gluon kernels take the same inputs
    # The Gluon dQ computes delta = rowsum(dO * O) - dLSE itself and writes it for dK/dV: it runs first and
    # there is no preprocess launch. Otherwise the preprocess writes delta for both kernels.
    fused_delta = dq_config is None and hopper
    if fused_delta:
        dq = hopper_dq(q, k, v, do, lse, delta, kv_counts, kv_indices, scale, o=o, dlse=dlse)
    elif Sq:
        _bwd_preprocess[(triton.cdiv(Sq, 128), B * H)](
            o, do, dlse if dlse is not None else delta, delta, *bhs_strides(o, do),
            H, Sq, HEAD_DIM=D, HEAD_DIM_PAD=d_pad, HAS_DLSE=dlse is not None, BLOCK=128,
        )
    qk_scale = scale * LOG2E
    common = dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_Q=block_q, BLOCK_KV=block_kv)

    if dkdv_config is None and hopper:
        dk, dv = hopper_dkdv(q, k, v, do, lse, delta, q_counts, q_indices, scale)
    else:
        dk, dv = new_output(k), new_output(v)
        if Skv:
            dkdv_args = (
                q, k, v, do, lse, delta, dk, dv, q_counts, q_indices, *bhs_strides(q, k, v, do, dk, dv),
                *broadcast_strides(q_counts), *broadcast_strides(q_indices)[:3], H, Sq, Skv, qk_scale, scale,
            )
            dkdv_meta = dict(common, EVEN_Q=Sq % block_q == 0, TMA_OK=tma_ready(Sq > 0, q, do))
            if dkdv_config is None and interpreting():
                dkdv_config = DkdvConfig(block_kv, block_q, 4, 1, _interpret_tma())  # whole blocks: fewer steps
            _launch(_bwd_dkdv, None if dkdv_config is None else DkdvConfig(*dkdv_config), dkdv_args, dkdv_meta,
                    triton.cdiv(Skv, block_kv), block_kv, B * H, ("BLOCK_N1", "BLOCK_M1"))

    if not fused_delta:
        dq = new_output(q)
        if Sq:
            dq_args = (
                q, k, v, do, lse, delta, dq, kv_counts, kv_indices, *bhs_strides(q, k, v, do, dq),
                *broadcast_strides(kv_counts), *broadcast_strides(kv_indices)[:3], H, Sq, Skv, qk_scale, scale,
            )
            dq_meta = dict(common, EVEN_KV=Skv % block_kv == 0, TMA_OK=tma_ready(Skv > 0, k, v))
            if dq_config is None and interpreting():
                dq_config = DqConfig(block_q, block_kv, 4, 1, _interpret_tma())
            _launch(_bwd_dq, None if dq_config is None else DqConfig(*dq_config), dq_args, dq_meta,
                    triton.cdiv(Sq, block_q), block_q, B * H, ("BLOCK_M2", "BLOCK_N2"))
    return dq, dk, dv
