"""Warp-specialised block-sparse attention dQ for Hopper (sm_90), written in Gluon.

Same contract as the Triton ``_bwd_dq`` (``triton_bwd.py``) for the case it covers - CUDA tensors on a
compute capability 9.x GPU, fp16 / bf16, head dim 128, 128x128 layout blocks - and chosen over it by
:func:`.triton_bwd.block_sparse_bwd` whenever :func:`._hopper_common.hopper_bwd_supported` says so
(``DIT_SPARSE_HOPPER_BWD=0`` turns it off, with the dK/dV kernel). Inputs: the forward layout
``kv_counts`` int32 ``[B|1, H|1, Mq]`` / ``kv_indices`` int32 ``[B|1, H|1, Mq, Mk]`` (first ``kv_counts``
entries valid, in any order), the natural-log ``lse`` and ``delta = rowsum(dO * O) - dLSE`` (fp32
``[B, H, Sq]``, contiguous), q / k / v / do ``[B, H, S, D]`` with any 16-byte aligned strides. Output:
``dQ = scale * dS K`` in q's dtype and strides. The backward launcher passes the forward output ``o`` (and
``dLSE``) instead of delta: each consumer then computes its rows' delta from O (global loads issued before
it waits for the Q / dO tiles) and the dO tile in shared memory, and stores it for the dK/dV kernel, which
runs after this one - so the backward has no preprocess launch (it re-read dO and O: 200 MB at Wan-480p).

Design (the dK/dV kernel of ``hopper_dkdv.py`` with queries and keys swapped)
-----------------------------------------------------------------------------
One CTA per (query block of 128 rows, batch x head): grid ``(Mq, B*H)``, the query blocks of a (batch, head)
taken longest key list first (``layout_ops.work_order``), 12 warps in three partitions:

* producer (1 warp): TMA-loads the CTA's Q and dO tiles once, then walks ``kv_indices[b, h, m, :count]``
  and TMA-loads 128-key tiles of K and V (rows past ``Skv`` arrive as zeros) into a ring of ``NUM_STAGES``
  stages, with separate "ready" barriers for K and V (``S = Q K^T`` starts before V has landed) and one
  "empty" barrier (count 2) per stage.
* two consumers (one warpgroup each, query rows 0-63 and 64-127), each loading its 64 ``lse`` / ``delta``
  values once, then per step: ``S = Q K^T`` and ``dP = dO V^T`` (async wgmma from shared memory),
  ``P = exp2(min(S * scale*log2e - lse*log2e, 0))`` while ``dP`` runs, ``dS = P (dP - delta)``,
  ``dQ += dS K`` (dS in registers as the A operand). ``S`` of step j+1 is issued right behind ``dQ_j`` and
  retires with it, as in the dK/dV kernel.
* epilogue: ``dQ *= scale``, staged in the warpgroup's own rows of the Q tile, TMA-stored (rows past ``Sq``
  clipped).

Tails without selects: query rows past ``Sq`` have Q = dO = 0 and lse = delta = 0, so dS = 0. Key columns
past ``Skv`` have K = V = 0, so S = 0 and ``P = exp2(-lse*log2e)`` - which overflows for rows whose real
scores are all very negative; the exponent is clamped at 0 (a no-op for real entries, where P <= 1), so P
stays finite and the zero K row makes their contribution exactly 0, wherever the partial block sits in the
list. ``lse = -inf`` (query blocks without key blocks) gives P = 0; such a CTA stores zeros.

Measured on an H200 (bf16, Wan-480p B1 H12 S=32760 D128, random 128-blocks, 2026-11-30): 0.80 / 1.51 /
3.57 / 14.2 ms at 5 / 10 / 25 / 100% against the Triton dQ's 1.00 / 1.92 / 4.55 / 19.7 ms, with results
bit-identical to it. Issuing S and dP together each step instead of S early was within 2-4% (0.78 / 1.50 /
3.57 / 13.7); two 64-key halves per stage were slower (0.81 / 1.58 / 4.12 / 15.2).
"""

from __future__ import annotations

from ._common import LOG2E, bhs_strides, new_output
from ._hopper_common import (
    BLOCK, CONSUMER_REGS, CONSUMER_WARPS, HAVE_GLUON, MAXNREG, PRODUCER_REGS, layout_args, tma_descriptor,
)

__all__ = ["hopper_dq", "kernel_launch"]

NUM_STAGES = 2  # Q + dO take 64 KB, a stage of K + V 64 KB: 3 would need 256 KB

if HAVE_GLUON:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )

    from ._hopper_common import as_2d as _as_2d, cta_block_list as _cta_block_list, release as _release


if HAVE_GLUON:

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready,
                  empty, idx_ptr, n, b, h, q_row0, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        """1 warp: Q and dO once, then per step the K and V tiles of the next listed key block."""
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q_row0, 0], q_bar, q_smem)
        tma.async_copy_global_to_shared(do_desc, [b, h, q_row0, 0], q_bar, do_smem)
        kv_bytes: gl.constexpr = k_desc.block_type.nbytes
        for j in range(n):
            row = gl.load(idx_ptr + j) * BLOCK_N
            s = j % NUM_STAGES
            ph = (j // NUM_STAGES) & 1
            # Fresh mbarriers count as "phase 1 complete": the first NUM_STAGES waits pass at once.
            mbarrier.wait(empty.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, row, 0], k_ready.index(s), k_bufs.index(s))
            mbarrier.expect(v_ready.index(s), kv_bytes)
            tma.async_copy_global_to_shared(v_desc, [b, h, row, 0], v_ready.index(s), v_bufs.index(s))

    @gluon.jit
    def _issue_s(q_tile, k_bufs, k_ready, zero_s, j, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr):
        """Wait for K_j and issue ``S_j = Q K_j^T`` (async); returns the token and the K_j^T view."""
        s = j % NUM_STAGES
        mbarrier.wait(k_ready.index(s), (j // NUM_STAGES) & 1)
        k_t = _as_2d(k_bufs.index(s), BLOCK_N, HEAD_DIM).permute((1, 0))
        tok = warpgroup_mma(q_tile, k_t, zero_s, use_acc=False, is_async=True)
        return tok, k_t

    @gluon.jit
    def _dq_issue(st, do_tile, k_bufs, v_bufs, v_ready, dq, zero_s, lse2, delta, qk_scale, j,
                  op_layout: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, DTYPE: gl.constexpr):
        """With ``S_j`` retired (``st``) and no wgmma in flight: issue ``dP_j``; P (while dP runs); wait dP;
        dS; issue ``dQ += dS K_j``. Returns the dQ token, its register operand and the K_j tile."""
        s = j % NUM_STAGES
        mbarrier.wait(v_ready.index(s), (j // NUM_STAGES) & 1)
        v_t = _as_2d(v_bufs.index(s), BLOCK_N, HEAD_DIM).permute((1, 0))
        tok_dp = warpgroup_mma(do_tile, v_t, zero_s, use_acc=False, is_async=True)
        # clamped exponent: see the module docstring (key columns past Skv)
        p = gl.exp2(gl.minimum(st * qk_scale - gl.expand_dims(lse2, 1), 0.0))
        dp = warpgroup_mma_wait(0, deps=(tok_dp, do_tile, v_t))[0]
        ds = p * (dp - gl.expand_dims(delta, 1))
        ds_op = gl.convert_layout(ds.to(DTYPE), op_layout)
        k_tile = _as_2d(k_bufs.index(s), BLOCK_N, HEAD_DIM)
        tok_dq = warpgroup_mma(ds_op, k_tile, dq, is_async=True)
        return tok_dq, ds_op, k_tile

    @gluon.jit
    def _consumer(dq_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, lse_ptr, delta_ptr,
                  o_ptr, dlse_ptr, stride_ob, stride_oh, stride_os,
                  n, b, h, bh, q_row0, q_len, qk_scale, scale,
                  WG: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, FUSED_DELTA: gl.constexpr,
                  HAS_DLSE: gl.constexpr):
        """One consumer warpgroup: query rows ``[WG * 64, WG * 64 + 64)`` of the block. Steps 0 .. n-2 in the
        loop (S of step j+1 issued behind dQ_j, both retired together), the last one peeled."""
        ROWS: gl.constexpr = 64
        BLOCK_M: gl.constexpr = 128
        HEAD_DIM: gl.constexpr = 128
        NW: gl.constexpr = gl.num_warps()
        DTYPE: gl.constexpr = dq_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        # lse / delta of this warpgroup's rows, once (rows past Sq read as 0: dS = 0 there).
        rows = q_row0 + WG * ROWS + gl.arange(0, ROWS, layout=row_layout)
        in_range = rows < q_len
        row_base = bh.to(gl.int64) * q_len
        lse = gl.load(lse_ptr + row_base + rows, mask=in_range, other=0.0)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        q_tile = _as_2d(q_smem, BLOCK_M, HEAD_DIM).slice(WG * ROWS, ROWS, dim=0)
        do_tile = _as_2d(do_smem, BLOCK_M, HEAD_DIM).slice(WG * ROWS, ROWS, dim=0)
        if FUSED_DELTA:
            # delta = rowsum(dO * O) - dLSE here instead of a preprocess launch: O from global memory (its
            # load overlaps the TMA of Q / dO), dO from the tile the MMAs use; stored for the dK/dV kernel.
            tile: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
            o_rows = q_row0 + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, tile))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile))
            o_ptrs = (o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                      + gl.expand_dims(o_rows.to(gl.int64) * stride_os, 1) + gl.expand_dims(cols, 0))
            o = gl.load(o_ptrs, mask=gl.expand_dims(o_rows < q_len, 1), other=0.0)
            mbarrier.wait(q_bar, 0)
            do = do_tile.load(tile)
            delta = gl.convert_layout(gl.sum(do.to(gl.float32) * o.to(gl.float32), axis=1), row_layout)
            if HAS_DLSE:
                delta -= gl.load(dlse_ptr + row_base + rows, mask=in_range, other=0.0)
            gl.store(delta_ptr + row_base + rows, delta, mask=in_range)
        else:
            delta = gl.load(delta_ptr + row_base + rows, mask=in_range, other=0.0)
            mbarrier.wait(q_bar, 0)
        dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)

        if n > 0:
            tok_s, k_t = _issue_s(q_tile, k_bufs, k_ready, zero_s, 0, NUM_STAGES, BLOCK_N, HEAD_DIM)
            st = warpgroup_mma_wait(0, deps=(tok_s, q_tile, k_t))[0]
            for j in range(n - 1):
                tok_dq, ds_op, k_tile = _dq_issue(st, do_tile, k_bufs, v_bufs, v_ready, dq, zero_s, lse2, delta,
                                                  qk_scale, j, op_layout, NUM_STAGES, BLOCK_N, HEAD_DIM, DTYPE)
                tok_s, k_nt = _issue_s(q_tile, k_bufs, k_ready, zero_s, j + 1, NUM_STAGES, BLOCK_N, HEAD_DIM)
                dq, st = warpgroup_mma_wait(0, deps=(tok_dq, tok_s, ds_op, k_tile, q_tile, k_nt))[:2]
                _release(empty.index(j % NUM_STAGES))
            jl = n - 1
            tok_dq, ds_op, k_tile = _dq_issue(st, do_tile, k_bufs, v_bufs, v_ready, dq, zero_s, lse2, delta,
                                              qk_scale, jl, op_layout, NUM_STAGES, BLOCK_N, HEAD_DIM, DTYPE)
            dq = warpgroup_mma_wait(0, deps=(tok_dq, ds_op, k_tile))[0]
            _release(empty.index(jl % NUM_STAGES))

        # Epilogue: stage dQ in this warpgroup's own rows of the Q tile (its last MMA reading them has
        # retired; a CTA without key blocks still waited for Q to land), then TMA-store, rows past Sq clipped.
        q_tile.store((dq * scale).to(DTYPE))
        fence_async_shared()
        tma.async_copy_shared_to_global(dq_desc, [b, h, q_row0 + WG * ROWS, 0],
                                        q_smem.slice(WG * ROWS, ROWS, dim=2))
        tma.store_wait(0)

    @gluon.jit
    def _second_consumer(dq_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, lse_ptr,
                         delta_ptr, o_ptr, dlse_ptr, stride_ob, stride_oh, stride_os,
                         n, b, h, bh, q_row0, q_len, qk_scale, scale,
                         NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, FUSED_DELTA: gl.constexpr,
                         HAS_DLSE: gl.constexpr):
        """The worker-partition consumer: query rows 64-127."""
        _consumer(dq_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, lse_ptr, delta_ptr,
                  o_ptr, dlse_ptr, stride_ob, stride_oh, stride_os,
                  n, b, h, bh, q_row0, q_len, qk_scale, scale, 1, NUM_STAGES, BLOCK_N, FUSED_DELTA, HAS_DLSE)

    @gluon.jit
    def _hopper_dq_kernel(
        q_desc, do_desc, k_desc, v_desc, dq_desc, lse_ptr, delta_ptr, o_ptr, dlse_ptr, counts_ptr, idx_ptr, order_ptr,
        H, q_len, qk_scale, scale,
        stride_ob, stride_oh, stride_os,
        stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im, stride_wb, stride_wh, stride_wm,
        NUM_STAGES: gl.constexpr, FUSED_DELTA: gl.constexpr, HAS_DLSE: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        gl.static_assert(BLOCK_M == 128 and HEAD_DIM == 128 and BLOCK_N == 128)
        gl.static_assert(dq_desc.block_type.shape[2] == BLOCK_M // 2)

        b, h, bh, q_row0, n, my_idx = _cta_block_list(
            counts_ptr, idx_ptr, order_ptr, H, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
            stride_wb, stride_wh, stride_wm, BLOCK_M)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, do_desc.block_type.shape, do_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release every stage once

        # Worker order: the 4-warp consumer first, so it gets a whole warpgroup, then the producer.
        gl.warp_specialize([
            (_consumer, (dq_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, lse_ptr,
                         delta_ptr, o_ptr, dlse_ptr, stride_ob, stride_oh, stride_os,
                         n, b, h, bh, q_row0, q_len, qk_scale, scale, 0, NUM_STAGES, BLOCK_N, FUSED_DELTA, HAS_DLSE)),
            (_second_consumer, (dq_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, lse_ptr,
                                delta_ptr, o_ptr, dlse_ptr, stride_ob, stride_oh, stride_os,
                                n, b, h, bh, q_row0, q_len, qk_scale, scale, NUM_STAGES, BLOCK_N, FUSED_DELTA,
                                HAS_DLSE)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready,
                         empty, my_idx, n, b, h, q_row0, NUM_STAGES, BLOCK_N)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def kernel_launch(q, k, v, do, lse, delta, dq, kv_counts, kv_indices, scale: float,
                  num_stages: int = NUM_STAGES, o=None, dlse=None, order=None):
    """``(grid, args, kwargs)`` of one launch; shared by the launcher and the sm_90 compile test. With ``o``
    the kernel computes ``delta`` (and writes it) instead of reading it. ``order``: the query blocks in the
    order the CTAs take them (default longest list first: :func:`._hopper_common.layout_args`)."""
    B, H, Sq, _ = q.shape
    layout, layout_strides = layout_args(kv_counts, kv_indices, order)
    fused = o is not None
    o_arg = o if fused else delta  # an unused pointer argument when delta is given
    args = (tma_descriptor(q, BLOCK), tma_descriptor(do, BLOCK), tma_descriptor(k, BLOCK), tma_descriptor(v, BLOCK),
            tma_descriptor(dq, BLOCK // 2), lse, delta, o_arg, dlse if dlse is not None else delta,
            *layout, H, Sq, float(scale) * LOG2E, float(scale), *(bhs_strides(o) if fused else (0, 0, 0)),
            *layout_strides)
    kwargs = dict(NUM_STAGES=num_stages, FUSED_DELTA=fused, HAS_DLSE=fused and dlse is not None,
                  PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    grid = (triton.cdiv(Sq, BLOCK), B * H)
    return grid, args, kwargs


def hopper_dq(q, k, v, do, lse, delta, kv_counts, kv_indices, scale: float, o=None, dlse=None):
    """dQ of block-sparse attention on inputs :func:`._hopper_common.hopper_bwd_supported` accepted.

    q, do ``[B, H, Sq, 128]``; k, v ``[B, H, Skv, 128]``; lse (natural log) and delta fp32 ``[B, H, Sq]``
    contiguous; kv_counts int32 ``[B|1, H|1, Mq]``, kv_indices int32 ``[B|1, H|1, Mq, Mk]`` (last dim
    contiguous). Given the forward output ``o`` (``[B, H, Sq, 128]``, last dim contiguous; and optionally
    ``dlse`` fp32 ``[B, H, Sq]`` contiguous), the kernel computes ``delta = rowsum(dO * O) - dLSE`` itself
    and writes it into ``delta`` (then an output, for the dK/dV kernel) - no preprocess launch. Returns
    ``dq`` shaped (and, where dense, strided) like q.
    """
    if not (lse.is_contiguous() and delta.is_contiguous() and kv_indices.stride(-1) == 1):
        raise ValueError("hopper_dq needs contiguous lse / delta and a last-dim contiguous kv_indices")
    if o is not None and (o.stride(-1) != 1 or (dlse is not None and not dlse.is_contiguous())):
        raise ValueError("hopper_dq needs a last-dim contiguous o and a contiguous dlse")
    dq = new_output(q)
    grid, args, kwargs = kernel_launch(q, k, v, do, lse, delta, dq, kv_counts, kv_indices, scale, o=o, dlse=dlse)
    _hopper_dq_kernel[grid](*args, **kwargs)
    return dq
