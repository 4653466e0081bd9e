"""Warp-specialised block-sparse attention dK / dV for Hopper (sm_90), written in Gluon.

Same contract as the Triton ``_bwd_dkdv`` (``triton_bwd.py``) for the case it covers - CUDA tensors on a
compute capability 9.x GPU, fp16 / bf16, head dim 128, 128x128 layout blocks - and chosen over it by
:func:`.triton_bwd.block_sparse_bwd` whenever :func:`._hopper_common.hopper_bwd_supported` says so
(``DIT_SPARSE_HOPPER_BWD=0`` turns it off). Inputs: the TRANSPOSED layout ``q_counts`` int32
``[B|1, H|1, Mk]`` / ``q_indices`` int32 ``[B|1, H|1, Mk, Mq]`` (first ``q_counts`` entries valid, ascending as
``transpose_layout_tensors`` makes them), the natural-log ``lse`` and ``delta = rowsum(dO * O) - dLSE``
(both fp32 ``[B, H, Sq]``, contiguous), q / k / v / do ``[B, H, S, D]`` with any 16-byte aligned strides.

Design (FA3-backward style, fitted to 227 KB of shared memory and 240 registers per consumer thread)
-------------------------------------------------------------------------------------------------
One CTA per (key block of 128 rows, batch x head): grid ``(Mk, B*H)``, the key blocks of a (batch, head)
taken longest query list first (``layout_ops.work_order``; the hardware starts CTAs in grid order, so the
short ones fill the last wave), 12 warps in three partitions:

* producer (1 warp): TMA-loads K_j and V_j once, each on its own mbarrier, then walks the key block's
  query-block list and, per step, TMA-loads a 64-row query sub-tile of Q and dO (4-D descriptors; rows past
  ``Sq`` arrive as zeros) plus the matching ``lse`` / ``delta`` slices (masked ``cp.async``, zero-filled
  past ``Sq``; its ``cp.async.mbarrier.arrive`` makes the stage's "ready" barrier wait for them too) into a
  ring of ``NUM_STAGES`` stages with "ready" (expect-tx) and "empty" (count 2) mbarriers.
* two consumers (one warpgroup each, key rows 0-63 and 64-127 of the block), per step and 64 queries:
  ``S^T = K Q^T``; ``dP^T = V dO^T``; ``P^T = exp2(S^T * scale*log2e - lse*log2e)``; ``dV += P^T dO``
  (P^T cast to the input dtype, in registers as the A operand); ``dS^T = P^T (dP^T - delta)``;
  ``dK += dS^T Q``. The first ``S^T`` waits for K only. ``S^T`` of step j+1 is issued right behind ``dV_j``
  / ``dK_j`` and retires with them, so the tensor core has this warpgroup's next MMA queued while it waits;
  the step then starts with ``dP^T`` and computes P while it runs. (Keeping an MMA in flight across the
  loop back-edge made ptxas serialise every wgmma of the kernel.) The two warpgroups drift freely.
* epilogue: ``dK *= scale``; each consumer stages its dK / dV rows in its own half of the K / V buffers and
  TMA-stores them (rows past ``Skv`` clipped).

Tails need no selects in the loop: query rows past ``Sq`` have Q = dO = 0 and lse = delta = 0, so P = 1,
dP = 0, dS = 0 and they add exactly nothing; a 64-row sub-tile wholly past ``Sq`` is skipped. Key rows past
``Skv`` are computed and clipped at the store. ``lse = -inf`` (query rows without key blocks) becomes ``+inf``
in the exp2 domain, so P = 0 there.

Measured on an H200 (bf16, Wan-480p B1 H12 S=32760 D128, random 128-blocks, 2026-11-30): 1.05 / 2.04 /
4.9 / 18.8 ms at 5 / 10 / 25 / 100% against the Triton dK / dV's 1.47 / 2.70 / 6.37 / 29.8 ms, with results
bit-identical to it. 64 queries per step with two stages; 3 and 4 stages were within 3% overall, a
variant without the early ``S^T`` issue 2-7% slower, and 128 queries per step spill (two 64x128 fp32
accumulators plus 128-wide S^T / dP^T exceed 240 registers). Longest list first against the natural order
(2026-12-01, same process, three rounds, ms): Wan-480p 1.07-1.10 / 1.10-1.14 at 5%, 2.03-2.09 / 2.07-2.09 at
10%, 4.80-4.86 / 4.92-4.97 at 25%; Hunyuan-720p 10% 52.3-53.0 / 55.2-55.7 (its column counts spread
59-132 around 93). Waiting for K alone before the first ``S^T`` measured no gain of its own (the natural
order with it 2.07-2.09 against the previous kernel's 2.06-2.10 at Wan 10%).
"""

from __future__ import annotations

from ._common import LOG2E, new_output
from ._hopper_common import (
    BLOCK, CONSUMER_REGS, CONSUMER_WARPS, HAVE_GLUON, MAXNREG, PRODUCER_REGS, layout_args, tma_descriptor,
)

__all__ = ["hopper_dkdv", "kernel_launch"]

BLOCK_M = 64  # queries per step
NUM_STAGES = 2

if HAVE_GLUON:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy, fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )

    from ._hopper_common import as_2d as _as_2d, cta_block_list as _cta_block_list, release as _release


if HAVE_GLUON:

    @gluon.jit
    def _num_steps(idx_ptr, count, q_len, BLOCK_M: gl.constexpr, BLOCK_Q: gl.constexpr):
        """Query sub-tiles to visit: ``count * BLOCK_Q / BLOCK_M``, less the last one when it lies wholly past
        ``Sq`` (the list is ascending, so the partial last query block comes last): no work on all-zero
        tiles, and no TMA box entirely out of bounds."""
        n = count * (BLOCK_Q // BLOCK_M)
        last = gl.load(idx_ptr + gl.maximum(count - 1, 0))
        drop = (count > 0) & (q_len - last * BLOCK_Q <= BLOCK_Q - BLOCK_M)
        return n - drop.to(gl.int32)

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs,
                  kv_bars, ready, empty, idx_ptr, n, b, h, bh, kv_row0, q_len, lse_ptr, delta_ptr,
                  NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_Q: gl.constexpr):
        """1 warp: K / V once (each on its own barrier), then per step a Q / dO sub-tile (TMA) and its lse /
        delta slices (cp.async)."""
        SUB: gl.constexpr = BLOCK_Q // BLOCK_M
        mbarrier.expect(kv_bars.index(0), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h, kv_row0, 0], kv_bars.index(0), k_smem)
        mbarrier.expect(kv_bars.index(1), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, h, kv_row0, 0], kv_bars.index(1), v_smem)

        vec_layout: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
        offs = gl.arange(0, BLOCK_M, layout=vec_layout)
        row_base = bh.to(gl.int64) * q_len
        lse_base = lse_ptr + row_base
        delta_base = delta_ptr + row_base
        tile_bytes: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes
        for j in range(n):
            row = gl.load(idx_ptr + j // SUB) * BLOCK_Q + (j % SUB) * BLOCK_M
            s = j % NUM_STAGES
            ph = (j // NUM_STAGES) & 1
            rows = row + offs
            in_range = rows < q_len
            # Fresh mbarriers count as "phase 1 complete": the first NUM_STAGES waits pass at once.
            mbarrier.wait(empty.index(s), ph ^ 1)
            bar = ready.index(s)
            # lse / delta: rows past Sq zero-filled. The (non-.noinc) cp.async arrive raises the pending
            # count and drops it again once this thread's copies have landed: the phase cannot complete
            # before.
            async_copy.async_copy_global_to_shared(lse_bufs.index(s), lse_base + rows, mask=in_range)
            async_copy.async_copy_global_to_shared(dl_bufs.index(s), delta_base + rows, mask=in_range)
            async_copy.mbarrier_arrive(bar)
            gl.thread_barrier()  # every lane's cp.async arrive is registered before the single-thread expect
            mbarrier.expect(bar, tile_bytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, row, 0], bar, q_bufs.index(s))
            tma.async_copy_global_to_shared(do_desc, [b, h, row, 0], bar, do_bufs.index(s))

    @gluon.jit
    def _wait_ready(ready, j, NUM_STAGES: gl.constexpr):
        mbarrier.wait(ready.index(j % NUM_STAGES), (j // NUM_STAGES) & 1)

    @gluon.jit
    def _stage_tiles(q_bufs, do_bufs, j, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                     HEAD_DIM: gl.constexpr):
        """Step j's Q and dO sub-tiles as ``[BLOCK_M, HEAD_DIM]`` matrices."""
        s = j % NUM_STAGES
        return _as_2d(q_bufs.index(s), BLOCK_M, HEAD_DIM), _as_2d(do_bufs.index(s), BLOCK_M, HEAD_DIM)

    @gluon.jit
    def _grads_issue(st, v_tile, q_t, do_t, lse_buf, dl_buf, dk, dv, zero_s, qk_scale,
                     col_layout: gl.constexpr, op_layout: gl.constexpr, DTYPE: gl.constexpr):
        """With ``S^T`` retired (``st``) and no wgmma in flight: issue ``dP^T``, P (while dP^T runs), issue
        ``dV``, wait ``dP^T``, dS, issue ``dK``. Returns the dV / dK tokens and their register operands
        (two groups left in flight)."""
        do_tt = do_t.permute((1, 0))
        tok_dp = warpgroup_mma(v_tile, do_tt, zero_s, use_acc=False, is_async=True)
        lse = lse_buf.load(col_layout)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        p = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        p_op = gl.convert_layout(p.to(DTYPE), op_layout)
        tok_dv = warpgroup_mma(p_op, do_t, dv, is_async=True)
        # in flight: [dP, dV]
        dpt = warpgroup_mma_wait(1, deps=(tok_dp, v_tile, do_tt))[0]
        delta = dl_buf.load(col_layout)
        ds = p * (dpt - gl.expand_dims(delta, 0))
        ds_op = gl.convert_layout(ds.to(DTYPE), op_layout)
        tok_dk = warpgroup_mma(ds_op, q_t, dk, is_async=True)
        return tok_dv, tok_dk, p_op, ds_op

    @gluon.jit
    def _consumer(dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs, kv_bars, ready, empty,
                  n, b, h, kv_row0, qk_scale, scale,
                  WG: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr):
        """One consumer warpgroup: key rows ``[WG * 64, WG * 64 + 64)`` of the block. Steps 0 .. n-2 in the
        loop (S^T of step j+1 issued behind dV_j / dK_j, all three retired together), the last one peeled."""
        ROWS: gl.constexpr = 64
        BLOCK_N: gl.constexpr = 128
        HEAD_DIM: gl.constexpr = 128
        NW: gl.constexpr = gl.num_warps()
        DTYPE: gl.constexpr = dk_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

        k_tile = _as_2d(k_smem, BLOCK_N, HEAD_DIM).slice(WG * ROWS, ROWS, dim=0)
        v_tile = _as_2d(v_smem, BLOCK_N, HEAD_DIM).slice(WG * ROWS, ROWS, dim=0)
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
        zero_s = gl.zeros([ROWS, BLOCK_M], gl.float32, s_layout)
        mbarrier.wait(kv_bars.index(0), 0)  # K: the first S^T need not wait for V

        if n > 0:
            _wait_ready(ready, 0, NUM_STAGES)
            q_t, do_t = _stage_tiles(q_bufs, do_bufs, 0, NUM_STAGES, BLOCK_M, HEAD_DIM)
            q_tt = q_t.permute((1, 0))
            tok_s = warpgroup_mma(k_tile, q_tt, zero_s, use_acc=False, is_async=True)
            mbarrier.wait(kv_bars.index(1), 0)  # V, while S^T runs
            st = warpgroup_mma_wait(0, deps=(tok_s, k_tile, q_tt))[0]
            for j in range(n - 1):
                s = j % NUM_STAGES
                q_t, do_t = _stage_tiles(q_bufs, do_bufs, j, NUM_STAGES, BLOCK_M, HEAD_DIM)
                tok_dv, tok_dk, p_op, ds_op = _grads_issue(st, v_tile, q_t, do_t, lse_bufs.index(s),
                                                           dl_bufs.index(s), dk, dv, zero_s, qk_scale,
                                                           col_layout, op_layout, DTYPE)
                _wait_ready(ready, j + 1, NUM_STAGES)
                q_n, do_n = _stage_tiles(q_bufs, do_bufs, j + 1, NUM_STAGES, BLOCK_M, HEAD_DIM)
                q_nt = q_n.permute((1, 0))
                tok_s = warpgroup_mma(k_tile, q_nt, zero_s, use_acc=False, is_async=True)
                dv, dk, st = warpgroup_mma_wait(0, deps=(tok_dv, tok_dk, tok_s, p_op, ds_op, q_t, do_t, k_tile,
                                                         q_nt))[:3]
                _release(empty.index(s))
            jl = n - 1
            s = jl % NUM_STAGES
            q_t, do_t = _stage_tiles(q_bufs, do_bufs, jl, NUM_STAGES, BLOCK_M, HEAD_DIM)
            tok_dv, tok_dk, p_op, ds_op = _grads_issue(st, v_tile, q_t, do_t, lse_bufs.index(s), dl_bufs.index(s),
                                                       dk, dv, zero_s, qk_scale, col_layout, op_layout, DTYPE)
            dv, dk = warpgroup_mma_wait(0, deps=(tok_dv, tok_dk, p_op, ds_op, q_t, do_t))[:2]
            _release(empty.index(s))

        # Epilogue: stage dK / dV in this warpgroup's own rows of the K / V buffers (its last MMA reading
        # them has retired; a CTA without query blocks still waits for them to land), then TMA-store, rows
        # past Skv clipped.
        mbarrier.wait(kv_bars.index(1), 0)
        k_tile.store((dk * scale).to(DTYPE))
        v_tile.store(dv.to(DTYPE))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, h, kv_row0 + WG * ROWS, 0],
                                        k_smem.slice(WG * ROWS, ROWS, dim=2))
        tma.async_copy_shared_to_global(dv_desc, [b, h, kv_row0 + WG * ROWS, 0],
                                        v_smem.slice(WG * ROWS, ROWS, dim=2))
        tma.store_wait(0)

    @gluon.jit
    def _second_consumer(dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs, kv_bars, ready,
                         empty, n, b, h, kv_row0, qk_scale, scale,
                         NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr):
        """The worker-partition consumer: key rows 64-127."""
        _consumer(dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs, kv_bars, ready, empty,
                  n, b, h, kv_row0, qk_scale, scale, 1, NUM_STAGES, BLOCK_M)

    @gluon.jit
    def _hopper_dkdv_kernel(
        q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, counts_ptr, idx_ptr, order_ptr,
        H, q_len, qk_scale, scale,
        stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in, stride_wb, stride_wh, stride_wn,
        NUM_STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        BLOCK_Q: gl.constexpr = 128
        gl.static_assert(BLOCK_N == 128 and HEAD_DIM == 128 and BLOCK_M == 64)
        gl.static_assert(dk_desc.block_type.shape[2] == BLOCK_N // 2)

        b, h, bh, kv_row0, count, my_idx = _cta_block_list(
            counts_ptr, idx_ptr, order_ptr, H, stride_cb, stride_ch, stride_cn, stride_ib, stride_ih, stride_in,
            stride_wb, stride_wh, stride_wn, BLOCK_N)
        n = _num_steps(my_idx, count, q_len, BLOCK_M, BLOCK_Q)

        k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [NUM_STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # per-stage 1-D rows
        lse_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], vec_smem)
        dl_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], vec_smem)
        kv_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # K, V
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bars.index(0), count=1)
        mbarrier.init(kv_bars.index(1), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect (cp.async arrives are net zero)
            mbarrier.init(empty.index(i), count=2)  # both consumers release every stage once

        # Worker order: the 4-warp consumer first, so it gets a whole warpgroup, then the producer.
        gl.warp_specialize([
            (_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs, kv_bars, ready,
                         empty, n, b, h, kv_row0, qk_scale, scale, 0, NUM_STAGES, BLOCK_M)),
            (_second_consumer, (dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs, kv_bars,
                                ready, empty, n, b, h, kv_row0, qk_scale, scale, NUM_STAGES, BLOCK_M)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs, dl_bufs,
                         kv_bars, ready, empty, my_idx, n, b, h, bh, kv_row0, q_len, lse_ptr, delta_ptr,
                         NUM_STAGES, BLOCK_M, BLOCK_Q)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def kernel_launch(q, k, v, do, lse, delta, dk, dv, q_counts, q_indices, scale: float,
                  num_stages: int = NUM_STAGES, order=None):
    """``(grid, args, kwargs)`` of one launch; shared by the launcher and the sm_90 compile test. ``order``:
    the key blocks in the order the CTAs take them (default longest list first:
    :func:`._hopper_common.layout_args`)."""
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    layout, layout_strides = layout_args(q_counts, q_indices, order)
    args = (tma_descriptor(q, BLOCK_M), tma_descriptor(do, BLOCK_M), tma_descriptor(k, BLOCK),
            tma_descriptor(v, BLOCK), tma_descriptor(dk, BLOCK // 2), tma_descriptor(dv, BLOCK // 2),
            lse, delta, *layout, H, Sq, float(scale) * LOG2E, float(scale), *layout_strides)
    kwargs = dict(NUM_STAGES=num_stages, PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS,
                  num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    grid = (triton.cdiv(Skv, BLOCK), B * H)
    return grid, args, kwargs


def hopper_dkdv(q, k, v, do, lse, delta, q_counts, q_indices, scale: float):
    """dK, dV of block-sparse attention on inputs :func:`._hopper_common.hopper_bwd_supported` accepted.

    q, do ``[B, H, Sq, 128]``; k, v ``[B, H, Skv, 128]``; lse (natural log) and delta fp32 ``[B, H, Sq]``
    contiguous; q_counts int32 ``[B|1, H|1, Mk]``, q_indices int32 ``[B|1, H|1, Mk, Mq]`` (last dim contiguous,
    ascending). Returns ``dk, dv`` shaped (and, where dense, strided) like k, v.
    """
    if not (lse.is_contiguous() and delta.is_contiguous() and q_indices.stride(-1) == 1):
        raise ValueError("hopper_dkdv needs contiguous lse / delta and a last-dim contiguous q_indices")
    dk, dv = new_output(k), new_output(v)
    grid, args, kwargs = kernel_launch(q, k, v, do, lse, delta, dk, dv, q_counts, q_indices, scale)
    _hopper_dkdv_kernel[grid](*args, **kwargs)
    return dk, dv
