"""Warp-specialised block-sparse attention forward for Hopper (sm_90), written in Gluon.

Same contract as :func:`.triton_fwd.block_sparse_fwd` for the case it covers - CUDA tensors on a compute
capability 9.x GPU, fp16 / bf16, head dim 128, 128x128 layout blocks, no linear branch - and chosen over it
by the custom op (``function.py``) whenever :func:`hopper_fwd_supported` says so. Everything else (other
GPUs, head dims 64 / 96, 64-blocks, fp32, the CPU interpreter, sparse-linear attention's fused launch)
runs the portable Triton kernel, which stays the reference implementation for tests on CPU.

One CTA per (query block, batch x head), grid ``(Mq, B*H)``, the query blocks of a (batch, head) taken
longest key list first (``layout_ops.work_order``: the natural order where every row is as long), 12 warps in
three partitions (``gl.warp_specialize``), FA3-like:

* producer (1 warp, 24 registers): TMA-loads the query tile once, then walks the block's index list and
  TMA-loads K_j and V_j into a ring of ``NUM_STAGES`` shared buffers. Each stage has separate "ready"
  (transaction-count) and "empty" mbarriers for K and for V, so ``Q K^T`` starts before V has landed.
* two consumers (one warpgroup each, rows 0-63 and 64-127 of the query block): ``S = Q K^T`` with async
  ``warpgroup_mma`` from shared memory, online softmax in registers (exp2, ``scale * log2(e)`` folded in),
  P cast to q's dtype and kept in registers as the A operand of ``O += P V``. Inside each warpgroup the loop
  is software-pipelined: ``S_{j+1}`` and ``P_j V_j`` are issued back to back and the softmax of j+1 runs
  while ``P_j V_j`` is still in the tensor core. Where K / V stay in L2 the two warpgroups drift freely, so
  one's softmax also overlaps the other's MMAs; where they stream from HBM (:func:`pingpong_wanted`) they
  take turns issuing each step's MMAs through two ``turn`` mbarriers (``PINGPONG``, FA3's schedule), which is
  7-16% faster there. Each warpgroup issues the same MMAs in the same order either way, so the results are
  bit-identical.

The TMA descriptors are 4-D over q / k / v / o as given (``[B, H, S, D]`` with their own strides, so a
``[B, S, H, D]`` buffer seen as ``[B, H, S, D]`` is read in place). Key rows past ``Skv`` arrive as zeros and
the partial last key block is masked to -inf wherever it sits in the list (any index order is correct).
The output tile is staged in the query buffer (each consumer overwrites only its own rows after its last
``Q K^T``) and written with a TMA store that clips rows past ``Sq``.

Measured on an H200 (bf16, Wan-480p B1 H12 S=32760 D128, random 128-blocks, 2026-11-30, against cuDNN
dense in the same run; effective rate = cuDNN time x density / time): 0.96 / 0.97 / 1.04 at 5 / 10 / 25%
with 3 stages, against 0.69 / 0.76 / 0.80 for the Triton kernel. Later runs timing ring depths and
schedules on the same layouts found a 2-stage ring as fast or faster everywhere (at Wan-480p up to 8%;
at Hunyuan-720p 3 stages had helped only while the warpgroups drifted freely), so the ring has 2.
A single 8-warp consumer ("ws1") reached only 0.77 / 0.82 / 0.84 / 0.86 and was dropped. Through the
public API in ``scripts/bench_kernels.py`` (its layouts, Wan-480p and Hunyuan-720p, 5 to 100%): see
``benchmarks/kernels.md``.
"""

from __future__ import annotations

import torch

from ._common import LOG2E, new_output
from ._hopper_common import (
    BLOCK, CONSUMER_REGS, CONSUMER_WARPS, HAVE_GLUON, MAXNREG, PRODUCER_REGS, hopper_supported, layout_args,
    tma_descriptor,
)

__all__ = ["hopper_fwd_supported", "hopper_block_sparse_fwd", "kernel_launch", "pingpong_wanted"]

NUM_CONSUMERS = 2
NUM_STAGES = 2  # depth of the K / V ring
# K + V of one (batch, head) above this fraction of the L2: the consumers take turns (pingpong_wanted).
L2_RESIDENT_FRACTION = 0.5


def pingpong_wanted(k: torch.Tensor, l2_bytes: int | None = None) -> bool:
    """Whether the two consumers should take turns issuing their MMAs (``PINGPONG``): where the K and V of
    one (batch, head) exceed half the L2, so key blocks stream from HBM. There the freely drifting
    warpgroups tend to wait on the same loads and then contend for the tensor core together; taking turns
    keeps one's softmax under the other's MMAs. Where K / V stay in L2 the turns only cost.

    H200 (50 MB L2), bf16, random 128-blocks, ms, two rounds each, same run (2026-11-30 23:00 UTC), 2-stage
    ring free / ping-pong: Hunyuan-720p (60.8 MB of K + V per head) 17.1-17.4 / 15.4-15.7 at 5%,
    33.1-33.6 / 29.7-30.4 at 10%, 80.2-81.9 / 74.3-76.4 at 25%, 312 / 289 dense; Wan-480p (16.8 MB)
    0.63-0.66 / 0.64 at 5%, 1.22-1.24 / 1.20-1.22 at 10%, 2.83-3.02 / 2.86-2.89 at 25%, 11.05-11.08 /
    11.20-11.24 dense. A 3-stage ring, free or ping-pong, was nowhere faster than 2 stages ping-pong."""
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(k.device).L2_cache_size
    per_head = 2 * k.shape[2] * k.shape[3] * k.element_size()
    return per_head > L2_RESIDENT_FRACTION * l2_bytes


if HAVE_GLUON:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )

    from ._hopper_common import as_2d as _as_2d, cta_block_list as _cta_block_list, release as _release


def hopper_fwd_supported(q, k, v, block_q: int, block_kv: int, capability=None) -> bool:
    """Whether :func:`hopper_block_sparse_fwd` can run these inputs (else the Triton kernel does): see
    :func:`._hopper_common.hopper_supported`. ``DIT_SPARSE_HOPPER_FWD=0`` turns it off."""
    return hopper_supported((q, k, v), block_q, block_kv, "DIT_SPARSE_HOPPER_FWD", capability)


if HAVE_GLUON:

    @gluon.jit
    def _softmax_update(s, m_i, l_i, kv_lim, qk_scale, MASK: gl.constexpr, s_layout: gl.constexpr,
                        BLOCK_N: gl.constexpr):
        """One online-softmax step on raw scores ``s``: returns ``(p fp32, alpha, m_new, l_new)``."""
        if MASK:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < kv_lim, 0), s, float("-inf"))
        # qk_scale = scale * log2(e) > 0, so the max of the scaled row is the scaled max.
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _kv_limit(idx_ptr, j, kv_len, EVEN_KV: gl.constexpr, BLOCK_N: gl.constexpr):
        """Valid key columns of the j-th listed block (``BLOCK_N`` unless it is the partial last one)."""
        if EVEN_KV:
            lim = BLOCK_N
        else:
            lim = kv_len - gl.load(idx_ptr + j) * BLOCK_N
        return lim

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
                  idx_ptr, count, b, h, q_row0, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q_row0, 0], q_bar, q_smem)
        kv_bytes: gl.constexpr = k_desc.block_type.nbytes
        for j in range(count):
            row = gl.load(idx_ptr + j) * BLOCK_N
            s = j % NUM_STAGES
            ph = (j // NUM_STAGES) & 1
            # Fresh mbarriers count as "phase 1 complete": the first NUM_STAGES waits pass at once.
            mbarrier.wait(k_empty.index(s), ph ^ 1)
            mbarrier.expect(k_ready.index(s), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, row, 0], k_ready.index(s), k_bufs.index(s))
            mbarrier.wait(v_empty.index(s), ph ^ 1)
            mbarrier.expect(v_ready.index(s), kv_bytes)
            tma.async_copy_global_to_shared(v_desc, [b, h, row, 0], v_ready.index(s), v_bufs.index(s))

    @gluon.jit
    def _qk(q_tile, k_bufs, k_ready, j, NUM_STAGES: gl.constexpr, zero_s, BLOCK_N: gl.constexpr,
            HEAD_DIM: gl.constexpr):
        """Wait for K_j and issue ``S = Q K_j^T`` asynchronously; returns the wgmma token and the K_j^T view."""
        s_idx = j % NUM_STAGES
        mbarrier.wait(k_ready.index(s_idx), (j // NUM_STAGES) & 1)
        k_t = _as_2d(k_bufs.index(s_idx), BLOCK_N, HEAD_DIM).permute((1, 0))
        tok = warpgroup_mma(q_tile, k_t, zero_s, use_acc=False, is_async=True)
        return tok, k_t

    @gluon.jit
    def _turn_wait(turn, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """PINGPONG: wait for this warpgroup's k-th turn to issue MMAs (warpgroup 0 goes first)."""
        if PINGPONG:
            mbarrier.wait(turn.index(WG), (k & 1) ^ (1 - WG))

    @gluon.jit
    def _turn_pass(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """PINGPONG: this warpgroup has issued its MMAs; the other's turn."""
        if PINGPONG:
            _release(turn.index(1 - WG))

    @gluon.jit
    def _consumer_loop(q_tile, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn, idx_ptr, count, kv_len,
                       qk_scale, acc, m_i, l_i, s_layout: gl.constexpr, p_layout: gl.constexpr,
                       NUM_STAGES: gl.constexpr, EVEN_KV: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, DTYPE: gl.constexpr, ROWS: gl.constexpr, WG: gl.constexpr,
                       PINGPONG: gl.constexpr):
        """The key-block loop for ``count >= 1``. Iteration j (P_j ready on entry): issue S_{j+1}; issue
        O += P_j V_j; wait for S_{j+1} (P V still running); release K_{j+1}; softmax(S_{j+1}); wait for O;
        release V_j; rescale O."""
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        _turn_wait(turn, 0, WG, PINGPONG)
        tok, k_t = _qk(q_tile, k_bufs, k_ready, 0, NUM_STAGES, zero_s, BLOCK_N, HEAD_DIM)
        _turn_pass(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(tok, q_tile, k_t))[0]
        _release(k_empty.index(0))
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, _kv_limit(idx_ptr, 0, kv_len, EVEN_KV, BLOCK_N),
                                             qk_scale, not EVEN_KV, s_layout, BLOCK_N)
        p_op = gl.convert_layout(p.to(DTYPE), p_layout)

        for j in range(count - 1):
            jn = j + 1
            lim_n = _kv_limit(idx_ptr, jn, kv_len, EVEN_KV, BLOCK_N)  # scalar load issued early
            _turn_wait(turn, jn, WG, PINGPONG)
            tok_s, k_t = _qk(q_tile, k_bufs, k_ready, jn, NUM_STAGES, zero_s, BLOCK_N, HEAD_DIM)
            v_idx = j % NUM_STAGES
            mbarrier.wait(v_ready.index(v_idx), (j // NUM_STAGES) & 1)
            v_tile = _as_2d(v_bufs.index(v_idx), BLOCK_N, HEAD_DIM)
            tok_o = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            _turn_pass(turn, WG, PINGPONG)
            # wgmma groups retire in order: with one left in flight, S_{j+1} is complete.
            s = warpgroup_mma_wait(1, deps=(tok_s, q_tile, k_t))[0]
            _release(k_empty.index(jn % NUM_STAGES))
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, lim_n, qk_scale, not EVEN_KV, s_layout, BLOCK_N)
            p_next = gl.convert_layout(p.to(DTYPE), p_layout)
            acc = warpgroup_mma_wait(0, deps=(tok_o, p_op, v_tile))[0]
            _release(v_empty.index(v_idx))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
            p_op = p_next

        jl = count - 1
        v_idx = jl % NUM_STAGES
        mbarrier.wait(v_ready.index(v_idx), (jl // NUM_STAGES) & 1)
        v_tile = _as_2d(v_bufs.index(v_idx), BLOCK_N, HEAD_DIM)
        _turn_wait(turn, count, WG, PINGPONG)
        tok_o = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        _turn_pass(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(tok_o, p_op, v_tile))[0]
        _release(v_empty.index(v_idx))
        return acc, m_i, l_i

    @gluon.jit
    def _consumer(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn, idx_ptr,
                  lse_ptr, count, b, h, H, q_row0, q_len, kv_len, qk_scale,
                  WG: gl.constexpr, NUM_STAGES: gl.constexpr, EVEN_KV: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, PINGPONG: gl.constexpr):
        """One consumer warpgroup: rows ``[WG * ROWS, (WG + 1) * ROWS)`` of the query block."""
        ROWS: gl.constexpr = BLOCK_M // 2
        NW: gl.constexpr = gl.num_warps()
        DTYPE: gl.constexpr = o_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        q_tile = _as_2d(q_smem, BLOCK_M, HEAD_DIM).slice(WG * ROWS, ROWS, dim=0)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([ROWS], gl.float32, row_layout)
        mbarrier.wait(q_bar, 0)
        if count > 0:
            acc, m_i, l_i = _consumer_loop(q_tile, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, turn,
                                           idx_ptr, count, kv_len, qk_scale, acc, m_i, l_i, s_layout, p_layout,
                                           NUM_STAGES, EVEN_KV, BLOCK_N, HEAD_DIM, DTYPE, ROWS, WG, PINGPONG)

        # Rows without key blocks have l == 0: o = 0 and lse = -inf, never NaN.
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
        out = (acc * gl.expand_dims(inv, 1)).to(DTYPE)

        rows = q_row0 + WG * ROWS + gl.arange(0, ROWS, layout=row_layout)
        gl.store(lse_ptr + (b * H + h).to(gl.int64) * q_len + rows, lse, mask=rows < q_len)

        # Stage O in this warpgroup's rows of the Q buffer (its last Q K^T has completed), then TMA-store.
        q_tile.store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, h, q_row0 + WG * ROWS, 0],
                                        q_smem.slice(WG * ROWS, ROWS, dim=2))
        tma.store_wait(0)

    @gluon.jit
    def _second_consumer(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                         idx_ptr, lse_ptr, count, b, h, H, q_row0, q_len, kv_len, qk_scale,
                         NUM_STAGES: gl.constexpr, EVEN_KV: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, PINGPONG: gl.constexpr):
        """The worker-partition consumer: rows 64-127."""
        _consumer(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn, idx_ptr,
                  lse_ptr, count, b, h, H, q_row0, q_len, kv_len, qk_scale, 1, NUM_STAGES, EVEN_KV, BLOCK_M,
                  BLOCK_N, HEAD_DIM, PINGPONG)

    @gluon.jit
    def _hopper_fwd_kernel(
        q_desc, k_desc, v_desc, o_desc, lse_ptr, counts_ptr, idx_ptr, order_ptr,
        H, q_len, kv_len, qk_scale,
        stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im, stride_wb, stride_wh, stride_wm,
        NUM_STAGES: gl.constexpr, EVEN_KV: gl.constexpr, PINGPONG: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
        gl.static_assert(BLOCK_M == 128 and BLOCK_N == 128 and HEAD_DIM == 128)

        b, h, bh, q_row0, count, my_idx = _cta_block_list(
            counts_ptr, idx_ptr, order_ptr, H, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
            stride_wb, stride_wh, stride_wm, BLOCK_M)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            # both consumers release every buffer once
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)

        # Argument tuples written out in full: constexprs must stay constexpr in the worker partitions.
        # Worker order: the 4-warp consumer first, so it gets a whole warpgroup (warps 4-7), then the producer.
        gl.warp_specialize([
            (_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn, my_idx,
                         lse_ptr, count, b, h, H, q_row0, q_len, kv_len, qk_scale,
                         0, NUM_STAGES, EVEN_KV, BLOCK_M, BLOCK_N, HEAD_DIM, PINGPONG)),
            (_second_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                                my_idx, lse_ptr, count, b, h, H, q_row0, q_len, kv_len, qk_scale,
                                NUM_STAGES, EVEN_KV, BLOCK_M, BLOCK_N, HEAD_DIM, PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                         v_empty, my_idx, count, b, h, q_row0, NUM_STAGES, BLOCK_N)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # 4 warps = CONSUMER_WARPS, the launch's num_warps


def kernel_launch(q, k, v, o, lse, kv_counts, kv_indices, scale: float, num_stages: int = NUM_STAGES,
                  pingpong: bool = False, order=None):
    """``(grid, args, kwargs)`` of one launch of the Gluon kernel; shared by the launcher and the sm_90
    compile test (which compiles it on a machine without a GPU). ``order``: the query blocks in the order
    the CTAs take them (default longest list first: :func:`._hopper_common.layout_args`)."""
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    layout, layout_strides = layout_args(kv_counts, kv_indices, order)
    args = (tma_descriptor(q, BLOCK), tma_descriptor(k, BLOCK), tma_descriptor(v, BLOCK),
            tma_descriptor(o, BLOCK // NUM_CONSUMERS), lse, *layout, H, Sq, Skv, float(scale) * LOG2E,
            *layout_strides)
    kwargs = dict(NUM_STAGES=num_stages, EVEN_KV=Skv % BLOCK == 0, PINGPONG=pingpong, PRODUCER_REGS=PRODUCER_REGS,
                  CONSUMER_REGS=CONSUMER_REGS, num_warps=CONSUMER_WARPS, maxnreg=MAXNREG)
    grid = (triton.cdiv(Sq, BLOCK), B * H)
    return grid, args, kwargs


def hopper_block_sparse_fwd(q, k, v, kv_counts, kv_indices, scale: float):
    """Launch the Hopper forward on inputs :func:`hopper_fwd_supported` accepted (and validated by the API).

    ``kv_counts`` int32 ``[B|1, H|1, Mq]``, ``kv_indices`` int32 ``[B|1, H|1, Mq, Mk]`` (last dim contiguous;
    the first ``kv_counts`` entries of a row in any order). The consumers take turns where
    :func:`pingpong_wanted` says so.
    Returns ``o`` (q's dtype and, where dense, its strides) and the
    natural-log ``lse`` fp32 ``[B, H, Sq]`` (-inf and o = 0 for a query block without key blocks).
    """
    B, H, Sq, _ = q.shape
    o = new_output(q)
    lse = new_output(q, (B, H, Sq), torch.float32)
    grid, args, kwargs = kernel_launch(q, k, v, o, lse, kv_counts, kv_indices, scale,
                                       pingpong=pingpong_wanted(k))
    _hopper_fwd_kernel[grid](*args, **kwargs)
    return o, lse
