"""Forward Triton kernel of block-sparse attention and its launcher.

One program computes one layout query block (``BLOCK_M = block_q`` rows) of one (batch, head). It loads
its query tile once, then walks the key blocks listed in ``kv_indices`` (``kv_counts`` of them), each in
``BLOCK_KV // BLOCK_N`` steps, with an online softmax in the exp2 domain and fp32 accumulators.
Interior key blocks are loaded without masks; only the last key block of the sequence (when
``kv_len % block_kv != 0``) is loaded masked, in a separate step after the main loop - the ascending
order of the index list puts it last.

Compile-time variants:

* ``USE_TMA`` (per config): K / V tiles come through Hopper TMA tensor descriptors built in-kernel per
  (batch, head) (shape ``[kv_len, D]``, so tail rows and padded head-dim columns arrive as zeros) instead
  of pointer loads; only when the launcher found the tensors TMA-eligible (``TMA_OK``).
* ``FULL_ROWS`` (per launch, chosen on the host): every query block keeps every key block (a dense
  layout), so the loop walks the keys in order without reading the index lists. Sparse launches compile
  the gathered loop alone: on the H200 at 25% density the pointer kernel holding both loops behind a
  runtime branch took 3.95 ms against 3.43 ms for the gathered loop alone (round 1), while the in-order
  loop took 100% density from 14.5 to 12.5 ms.
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
from ..sparse_linear.triton_common import linear_rows
from .layout_ops import full_rows_hint

__all__ = ["block_sparse_fwd", "FwdConfig", "FWD_TUNE_SPACE", "LinearBranch"]


class FwdConfig(NamedTuple):
    """One forward kernel config; a plain ``(BLOCK_N, num_warps, num_stages)`` tuple means pointer loads."""

    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


# GPU configs: the H200 round-2 winner for 128-blocks, TMA (128, 8, 3) 3.50 ms at Wan-480p 25% bf16, with
# its pointer twin (3.95 ms; 3.43 ms in round 1 before the two-loop kernel) for tensors TMA cannot address,
# and the same pair with 64-wide tiles for 64-blocks (measured at 128-blocks: TMA 3.95 ms, pointer 4.73).
# _prune leaves one config per key (TMA or pointer, tile = layout block): the autotuner only times that one.
_FWD_GPU_CONFIGS = [
    FwdConfig(128, 8, 3, True), FwdConfig(128, 8, 3), FwdConfig(64, 8, 3, True), FwdConfig(64, 8, 3),
]
# A few variants around the winners for scripts/bench_kernels.py --tune (2 stages fit again with one loop).
FWD_TUNE_SPACE = [
    FwdConfig(128, 8, 3, True), FwdConfig(128, 8, 2, True), FwdConfig(128, 8, 3), FwdConfig(128, 8, 2),
    FwdConfig(64, 8, 3, True),
]


class LinearBranch(NamedTuple):
    """Inputs and output of sparse-linear attention's linear branch, for a ``LINEAR`` forward launch.

    ``r``: per query block the complement state ``R_i = sum over non-critical key blocks of phi(K_j)^T V_j``,
    ``[B*H, Mq, D, D]`` contiguous (zero for a block that keeps every key block); ``z``: the matching
    ``r_i = sum phi(K_j)``, fp32 ``[B*H, Mq, D]``; ``out``: the linear output, contiguous ``[B, H, Sq, D]``.
    """

    r: torch.Tensor
    z: torch.Tensor
    out: torch.Tensor
    feature_map: int
    eps: float


def _to_triton(cfg: FwdConfig) -> triton.Config:
    return triton.Config({"BLOCK_N": cfg.block_n, "USE_TMA": cfg.tma}, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)


def _configs():
    if interpreting():  # several configs need a GPU driver to benchmark; the launcher overrides this one
        return [_to_triton(FwdConfig(64, 4, 1))]
    return [_to_triton(c) for c in _FWD_GPU_CONFIGS]


def _prune(configs, named_args, **kwargs):
    """Configs whose tile is the layout's key block, TMA ones only (when the tensors allow TMA) or none."""
    block_kv = kwargs.get("BLOCK_KV", named_args.get("BLOCK_KV"))
    tma_ok = kwargs.get("TMA_OK", named_args.get("TMA_OK"))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] == block_kv and c.kwargs["USE_TMA"] == bool(tma_ok)]
    if not kept:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] == block_kv and not c.kwargs["USE_TMA"]]
    if not kept:
        raise ValueError(f"no forward config has BLOCK_N == block_kv={block_kv}; add one to the config list")
    q = named_args["Q"]
    row = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD")) * q.element_size()
    usage = functools.partial(fwd_shared_memory, row=row, block_m=kwargs.get("BLOCK_M", named_args.get("BLOCK_M")))
    return [fit_shared_memory(c, usage, shared_memory_limit(q)) for c in kept]


def fwd_shared_memory(kw: dict, stages: int, row: int, block_m: int) -> int:
    """Shared memory of a forward config (``row``: bytes of one padded head-dim row): a K and a V tile per
    stage plus the Q tile - what the kernel compiled for sm_90 asks, exactly, for fp32 and bf16 at head
    dim 128 (``tests/kernels/_triton_sm90_smem.py``)."""
    return stages * 2 * kw["BLOCK_N"] * row + block_m * row


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, kv_len, stride_ks, stride_vs, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MASK_KV: tl.constexpr, TMA: tl.constexpr,
):
    offs_kv = start + offs_n
    if TMA:
        # Descriptor shape [kv_len, HEAD_DIM]: rows past kv_len and padded columns arrive as zeros.
        k = k_desc.load([start, 0]).T
        v = v_desc.load([start, 0])
    else:
        # K is read transposed ([D, BLOCK_N]) so the dot is a plain q @ k^T.
        k_ptrs = k_base + offs_kv[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + offs_kv[:, None] * stride_vs + offs_d[None, :]
        if MASK_KV:
            kv_ok = offs_kv < kv_len
            if HEAD_DIM != HEAD_DIM_PAD:
                k = tl.load(k_ptrs, mask=kv_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_ptrs, mask=kv_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            else:
                k = tl.load(k_ptrs, mask=kv_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            if HEAD_DIM != HEAD_DIM_PAD:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
    qk = tl.dot(q, k)
    if MASK_KV:
        qk = tl.where((offs_kv < kv_len)[None, :], qk, float("-inf"))
    # qk_scale = scale * log2(e) > 0, so the row max of the scaled logits is the scaled row max.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_KV", "TMA_OK", "LINEAR", "FEATURE_MAP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, O, LSE, KV_COUNTS, KV_INDICES, OL, LIN_R, LIN_Z,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    H, q_len, kv_len, qk_scale, lin_eps,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, EVEN_KV: tl.constexpr, TMA_OK: tl.constexpr,
    FULL_ROWS: tl.constexpr, LINEAR: tl.constexpr, FEATURE_MAP: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    TMA: tl.constexpr = USE_TMA and TMA_OK
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < q_len

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM_PAD])
    else:
        k_desc = k_base
        v_desc = v_base

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    SUB: tl.constexpr = BLOCK_KV // BLOCK_N
    num_kv_blocks = tl.cdiv(kv_len, BLOCK_KV)
    if FULL_ROWS:
        # Every query block keeps key blocks 0, 1, ...: walk them in order, no index loads.
        n_tail = 1
        if EVEN_KV:
            n_tail = 0
        for it in range(0, (num_kv_blocks - n_tail) * SUB):
            start = tl.multiple_of(it * BLOCK_N, BLOCK_N)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, kv_len, stride_ks, stride_vs, qk_scale,
                offs_n, offs_d, HEAD_DIM, HEAD_DIM_PAD, False, TMA,
            )
    else:
        count = tl.load(KV_COUNTS + b * stride_cb + h * stride_ch + pid_m * stride_cm)
        idx_base = KV_INDICES + b * stride_ib + h * stride_ih + pid_m * stride_im
        n_main = count
        n_tail = 0
        if not EVEN_KV:
            # The partial last key block, if kept, is the last entry of the ascending list.
            last = tl.load(idx_base + tl.maximum(count - 1, 0))
            n_tail = tl.where((count > 0) & (last == num_kv_blocks - 1), 1, 0)
            n_main = count - n_tail
        for it in range(0, n_main * SUB):
            blk = tl.load(idx_base + it // SUB)
            start = tl.multiple_of(blk * BLOCK_KV + (it % SUB) * BLOCK_N, BLOCK_N)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, kv_len, stride_ks, stride_vs, qk_scale,
                offs_n, offs_d, HEAD_DIM, HEAD_DIM_PAD, False, TMA,
            )
    if not EVEN_KV:
        tail_start = (num_kv_blocks - 1) * BLOCK_KV
        for sub in range(0, n_tail * SUB):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, tail_start + sub * BLOCK_N, kv_len, stride_ks,
                stride_vs, qk_scale, offs_n, offs_d, HEAD_DIM, HEAD_DIM_PAD, True, TMA,
            )

    # Rows of a query block without key blocks have l_i == 0: output 0 and lse = -inf, never NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=row_ok)
    if LINEAR:
        linear_rows(q, OL, LIN_R, LIN_Z, pid_bh, pid_m, q_len, lin_eps, offs_m, offs_d,
                    HEAD_DIM, BLOCK_M, FEATURE_MAP)


def block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    block_q: int,
    block_kv: int,
    config: tuple | None = None,
    full_rows: bool | None = None,
    linear: LinearBranch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Skv, D]``; last dim contiguous, fp16 / bf16 / fp32.
        kv_counts: int32 ``[B|1, H|1, Mq]``; kv_indices: int32 ``[B|1, H|1, Mq, Mk]``, last dim contiguous.
        scale: softmax scale (> 0).
        config: a :class:`FwdConfig` (or a tuple of its fields, ``(BLOCK_N, num_warps, num_stages[, tma])``)
            to bypass the autotuner (benchmark sweeps, tests). ``tma=True`` on tensors that do not qualify
            (:func:`~._common.tma_eligible`) runs the pointer path.
        full_rows: compile the in-order loop that ignores the index lists. Only correct when every
            ``kv_counts`` entry equals ``Mk``; ``None`` (default) asks :func:`~.layout_ops.full_rows_hint`,
            which knows it from the second call on a layout, without a host sync.
        linear: sparse-linear attention's linear branch (:class:`LinearBranch`), computed in the same
            launch after the sparse rows: its output is written to ``linear.out``.

    Returns:
        ``o`` ``[B, H, Sq, D]`` (q's dtype and, where dense, its strides) and ``lse`` fp32 ``[B, H, Sq]``
        (natural log; ``-inf`` for rows without key blocks).
    """
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    o = new_output(q)
    lse = new_output(q, (B, H, Sq), torch.float32)
    if Sq == 0 or B * H == 0:
        return o, lse
    tma_ok = tma_ready(Skv > 0, k, v)
    if full_rows is None:
        full_rows = full_rows_hint(kv_counts, kv_indices.shape[-1])
    cs = broadcast_strides(kv_counts)
    is_ = broadcast_strides(kv_indices)
    grid = (triton.cdiv(Sq, block_q), B * H)
    lin_out, lin_r, lin_z = (linear.out, linear.r, linear.z) if linear is not None else (o, o, lse)
    args = (
        q, k, v, o, lse, kv_counts, kv_indices, lin_out, lin_r, lin_z,
        *bhs_strides(q, k, v, o), *cs[:3], *is_[:3],
        H, Sq, Skv, scale * LOG2E, linear.eps if linear is not None else 0.0,
    )
    meta = dict(
        HEAD_DIM=D, HEAD_DIM_PAD=padded_head_dim(D), BLOCK_M=block_q, BLOCK_KV=block_kv,
        EVEN_KV=Skv % block_kv == 0, TMA_OK=tma_ok, FULL_ROWS=bool(full_rows), LINEAR=linear is not None,
        FEATURE_MAP=linear.feature_map if linear is not None else 0,
    )
    if config is None and interpreting():
        # Whole layout blocks per step: the interpreter's cost grows with the number of steps.
        # DIT_SPARSE_INTERPRET_TMA=1 runs the descriptor path instead (tests cover both).
        config = FwdConfig(block_kv, 4, 1, os.environ.get("DIT_SPARSE_INTERPRET_TMA") == "1")
    if config is None:
        _block_sparse_fwd_kernel[grid](*args, **meta)
    else:
        cfg = FwdConfig(*config)
        _block_sparse_fwd_kernel.fn[grid](
            *args, **meta, BLOCK_N=cfg.block_n, USE_TMA=cfg.tma, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return o, lse
