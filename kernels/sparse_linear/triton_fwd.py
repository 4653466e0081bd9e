"""Triton forward of sparse-linear attention: key-block states, their complements, then one fused launch.

1. ``block_states`` (``triton_state.py``) - per key block j: ``H_j = phi(K_j)^T V_j`` (``[D, D]``) and
   ``z_j = sum phi(K_j)`` (fp32 ``[D]``), and their fp32 totals.
2. ``complement_states`` - per query block i, what its linear part covers: ``R_i = Htot - sum_{j crit} H_j``
   and ``r_i = ztot - sum_{j crit} z_j``, summed in fp32 from the stored values and rounded once (so no
   cancellation is lost to the rounding), zero for a query block whose every key block is critical. One
   program per (query block, slice of the state): thousands of short independent sums, so the loads stay
   in flight. (Walking the critical list inside the attention program instead serialised those loads behind
   each query block: 1.89 ms at Wan-480p 5%, against 0.83 ms for the sparse part alone.)
3. The block-sparse forward kernel (``kernels/block_sparse/triton_fwd.py``, ``LINEAR`` launch): the exact
   softmax attention over the critical blocks with all its tuning (TMA loads, unmasked interior blocks),
   then in the same program ``o_linear = phi(Q_i) R_i / (max(phi(Q_i) . r_i, 0) + eps)`` - one MMA per
   query block (``linear_rows``, ``triton_common.py``).

Tried and dropped (H200, Wan-480p, 5% critical blocks, 2026-11-30): a separate launch that sums each
query block's complement in registers and writes ``o_linear`` directly (no stored ``R_i``, no epilogue in
the attention kernel): 0.36 ms for that launch against 0.17 + 0.17 ms for pre-pass + epilogue, so no gain
(whole forward 1.40 vs 1.39 ms); gathering several critical blocks per step in it made it slower (0.54 ms).
Also dropped (same GPU and shapes, 2026-11-30, both variants profiled in one run):
the complement as one batched cuBLAS GEMM of a 0/1 "not critical" mask ``[Mq, Mk]`` by the stored states
(no totals needed): 0.267 + 0.070 ms for R and r against 0.151 + 0.015 ms for the list walk (whole forward
1.48 ms); and the linear output in a launch of its own after the sparse one: 0.213 ms against 0.177 ms
for the epilogue (whole forward 1.51 vs 1.48 ms). The epilogue itself is ``linear_rows`` in
``triton_common.py``.

On a Hopper GPU, where the block-sparse forward has its warp-specialised Gluon kernel
(``kernels/block_sparse/hopper_fwd.py``, which has no linear epilogue), step 3 is split instead: that kernel
for the critical blocks, then ``linear_output`` - a launch of its own that loads each query tile again and
runs the same ``linear_rows``. The separate launch costs ~0.04 ms more than the epilogue (measured above),
the Gluon kernel saves ~0.2 ms at 5% critical blocks.

The log-sum-exp is the block-sparse kernel's (natural log, ``-inf`` for rows without critical blocks);
the backward hands it to the block-sparse backward unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv

from ..block_sparse._common import bhs_strides, padded_head_dim
from ..block_sparse.hopper_fwd import hopper_block_sparse_fwd, hopper_fwd_supported
from ..block_sparse.triton_fwd import LinearBranch, block_sparse_fwd
from .triton_common import interpret_mode, linear_rows, row_tile
from .triton_state import block_states, complement_states

__all__ = ["sla_forward", "state_dtype", "linear_states", "linear_output"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the states H_j and R_i: bf16 for bf16 inputs (an MMA operand next to bf16 q / k /
    v; sums are taken in fp32 before the one rounding), fp32 otherwise (fp16 could overflow: H_j sums up
    to block_kv products)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def linear_states(
    k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_kv: int,
    feature_map_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R [B*H, Mq, D, D], r fp32 [B*H, Mq, D])``: per query block the linear part's state over its
    non-critical key blocks (layout tensors already expanded to ``[B, H, Mq(, Mk)]``)."""
    sd = state_dtype(k.dtype)
    hs, zs, htot, ztot = block_states(k, v, block_kv, feature_map_id, state_dtype=sd)
    return (complement_states(htot, hs, kv_counts, kv_indices, sd),
            complement_states(ztot, zs, kv_counts, kv_indices, torch.float32))


@triton.jit
def _linear_output_kernel(
    Q, OL, LIN_R, LIN_Z, stride_qb, stride_qh, stride_qs, H, q_len, eps,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, FEATURE_MAP: tl.constexpr,
):
    pid_m, pid_bh, b, h, offs_m, offs_d = row_tile(H, BLOCK_M, HEAD_DIM_PAD)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < q_len)[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    linear_rows(q, OL, LIN_R, LIN_Z, pid_bh, pid_m, q_len, eps, offs_m, offs_d, HEAD_DIM, BLOCK_M, FEATURE_MAP)


def linear_output(q: torch.Tensor, branch: LinearBranch, block_q: int) -> torch.Tensor:
    """The linear branch in a launch of its own: writes and returns ``branch.out`` (contiguous
    ``[B, H, Sq, D]``) from q ``[B, H, Sq, D]`` (last dim contiguous) and the complement states - what the
    ``LINEAR`` block-sparse launch computes after its sparse rows."""
    b, h, sq, d = q.shape
    grid = (cdiv(sq, block_q), b * h)
    _linear_output_kernel[grid](
        q, branch.out, branch.r, branch.z, *bhs_strides(q), h, sq, branch.eps,
        HEAD_DIM=d, HEAD_DIM_PAD=padded_head_dim(d), BLOCK_M=block_q, FEATURE_MAP=branch.feature_map,
        num_warps=4 if interpret_mode() else 8,
    )
    return branch.out


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
    ``(o_sparse [B, H, Sq, D], o_linear [B, H, Sq, D] contiguous, lse fp32 [B, H, Sq])`` (natural log).
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mq, mk = cdiv(sq, block_q), cdiv(sk, block_kv)
    counts = kv_counts.expand(b, h, mq)
    indices = kv_indices.expand(b, h, mq, mk)
    if b * h * sq == 0 or sk == 0:  # nothing to attend to: zero outputs, no row has a critical block
        zeros = torch.zeros(b, h, sq, d, device=q.device, dtype=q.dtype)
        return zeros, zeros.clone(), torch.full((b, h, sq), float("-inf"), device=q.device)
    r, z = linear_states(k, v, counts, indices, block_kv, feature_map_id)
    o_l = torch.empty(b, h, sq, d, device=q.device, dtype=q.dtype)
    branch = LinearBranch(r, z, o_l, feature_map_id, eps)
    if hopper_fwd_supported(q, k, v, block_q, block_kv):
        o_s, lse = hopper_block_sparse_fwd(q, k, v, kv_counts, kv_indices, scale)
        return o_s, linear_output(q, branch, block_q), lse
    o_s, lse = block_sparse_fwd(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv, linear=branch)
    return o_s, o_l, lse
