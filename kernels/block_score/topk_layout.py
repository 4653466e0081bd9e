"""Fused top-k block selection: from q and k ``[B, H, S, D]`` straight to a
:class:`~dit_sparse.block_layout.BlockLayout` (``kv_counts`` / ``kv_indices``) or a bool block mask, in two
launches instead of the ~15 small ones of ``block_scores`` + ``topk`` + ``sort`` + index assignment.

* ``_pool_qk_kernel``      - one launch pools q AND k (grid axis 2 picks the tensor; each branch inlines
  the same pooling helper, so q and k may differ in dtype, strides, length and block size). Pooled
  tensors are written transposed, fp32 ``[B, H, D, M]``, so the select kernel reads a row of M contiguous
  values per head dimension.
* ``_topk_select_kernel``  - one program per (BM query blocks, batch*head): scores the BM pooled queries
  against all Mk pooled keys (IEEE fp32 multiply-adds over the head dim, no TF32), selects the kept key
  blocks and writes ``kv_counts`` + the ascending kept indices followed by zero padding (or the bool
  mask row).

Selection starts from the order-preserving int32 image of each block's fp32 logit (its bits, with a
negative logit's magnitude bits flipped) and follows one rule (:func:`dit_sparse.patterns.topk.keep_rule`):
a block is kept iff its rank in the order (logit descending, lower block index first on ties) is below
``n_floor``, or (threshold rule) the softmax mass of the blocks before it is below ``threshold * total
mass`` (ratio rule: ``n_floor = n``, no mass term; threshold rule: ``n_floor = min(min_blocks, Mk)``, or Mk
when ``threshold >= 1``). Since the mass before a block grows with its rank, the kept blocks are the first
``n`` of the order.

The n-th largest order image ``t`` of each row comes one of two ways. The ratio rule (``n = n_floor``) on
rows of at least ``BISECT_MIN_LANES`` padded lanes bisects the int32 range for the largest ``t`` with
``#{image >= t} >= n``: 32 counting passes over the row, no sort. Otherwise a bitonic ``tl.topk`` sorts
the images, descending: the ``K`` largest, ``K`` the power of two >= ``n_floor`` for the ratio rule, the
whole padded row (``K = BN``) for the threshold rule, which then recovers the logits from the sorted
images (exactly: they are the logits' bits), forms the fp32 softmax weights and an fp64 prefix sum, and
counts ``n = max(n_floor, 1 + #{r < Mk - 1 : mass of ranks <= r < target})``; ``t`` is the n-th sorted
image. The kept blocks are those above ``t`` and the lowest-indexed of those equal to ``t`` (a prefix sum
over block order) up to ``n``: lower index first on ties, without sorting 64-bit (image, index) keys.

Until 2026-11-30 the kernel selected without a sort, by a per-row binary search over unique int64 keys
(order image, then block index; 41 steps at 256 key blocks). On an H200 the sort took the select launch
from 0.121 to 0.069 ms (ratio 0.1) and 0.317 to 0.098 ms (threshold 0.9) at Wan-480p, from 7.05 to 2.42 ms
and 18.2 to 4.24 ms at Hunyuan-720p, with identical layouts, and replaced it. The bisection of the ratio
rule (2026-11-30, later) is another search: over int32 images only, for the n-th value rather than a
unique key per block, with the ties resolved after it by the same prefix sum as the sort's - on long
rows it halves the sorted select (see :func:`ratio_select_method`).

Compaction is a prefix sum in block order: kept block j goes to slot ``#kept before j``, dropped block j
writes 0 to slot ``count + #dropped before j``, so every slot of the row is written exactly once.

Numerics, against ``TopK``'s PyTorch path (``block_scores`` then ``select``):

* no key-mean centring: ``block_scores`` subtracts the mean key, which shifts every logit of a row
  (query block) by the same constant; top-k ranking and softmax masses are shift-invariant, so neither
  rule's selection changes, and the fused path skips it (no extra pass over the pooled keys). Only
  rounding differs: fp32 rounding of the uncentred dot products, which can swap blocks whose scores tie
  to that precision;
* exact ties (equal fp32 logits): the lower block index wins (``torch.topk`` / ``torch.sort`` leave the
  order of ties unspecified, so only the kept scores are comparable there);
* threshold rule: logits ``score + log(length / block_kv)`` in fp32 (only the short tail block gets a
  term), ``exp`` in fp32, masses summed and compared with the threshold in fp64 (the threshold is passed
  as its fp64 bit pattern): an fp32 running sum can reach a threshold near 1 several blocks early, which
  is why ``TopK.select`` uses fp64 too.

Pooling q and k in one launch costs nothing in complexity (one branch on a program id, the same helper
in both branches), so it is fused; the score + select kernel cannot absorb the pooling, since every
program needs all pooled keys of its head.

Limits: ``Mk <= MAX_KV_BLOCKS`` (one row of keys is one register tile). ``TopK`` takes this path only up
to ``FUSED_MAX_KV_BLOCKS`` key blocks, where it measured faster than the PyTorch chain
(``scripts/bench_topk_build.py`` times the fused build also above that bound).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from dit_sparse.block_layout import cdiv
from dit_sparse.patterns.topk import keep_rule

from .api import _check, _use_triton
from .pool_score import block_means_tile, pool_tile

__all__ = [
    "MAX_KV_BLOCKS",
    "FUSED_MAX_KV_BLOCKS",
    "fused_topk_supported",
    "topk_layout",
    "topk_block_mask",
    "pool_qk_triton",
    "topk_select_triton",
    "naive_topk_layout",
]

#: Most key blocks a row may have (4096 blocks of 128 tokens: 524K-token sequences).
MAX_KV_BLOCKS = 4096
# Where TopK picks the fused build. Measured on an H200 (2026-11-30): at Wan-480p (Mk = 256) the fused build
# took 0.15 ms against 0.28 ms for the PyTorch chain; at Hunyuan-720p (Mk = 929) pool + select with the
# tiles of select_tile / pool_tile take 0.45 + 1.96 ms against 2.81 ms for the chain (2.96 ms with the
# earlier 16-warp select tile, when this bound was 512). Longer rows than measured take the chain.
FUSED_MAX_KV_BLOCKS = 1024
# Padded row width from which the ratio rule selects by bisection instead of a sort (ratio_select_method).
BISECT_MIN_LANES = 512
# Elements of the [BM, BN] register tile of the select kernel (query rows x key blocks).
_TILE_ELEMENTS = 8192


# ---------------------------------------------------------------------------------------------- pooling
@triton.jit
def _pool_tile(
    x_ptr, out_ptr, S, D, H, M, BLOCK,
    stride_b, stride_h, stride_s, stride_d,
    BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    # Means of BM consecutive blocks of one (batch, head) (pool_score.block_means_tile), stored
    # transposed: out[bh, d, m]. Programs past M do nothing (all masked).
    means, blocks = block_means_tile(x_ptr, S, D, H, M, BLOCK, stride_b, stride_h, stride_s, stride_d, BM, BT, BD)
    offs_d = tl.arange(0, BD)
    out = out_ptr + tl.program_id(1).to(tl.int64) * D * M + offs_d[None, :] * M + blocks[:, None]
    tl.store(out, means, mask=(blocks[:, None] < M) & (offs_d[None, :] < D))


@triton.jit
def _pool_qk_kernel(
    q_ptr, k_ptr, qt_ptr, kt_ptr,
    Sq, Sk, D, H, Mq, Mk, BLOCK_Q, BLOCK_K,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd,
    BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    # Grid (blocks / BM, B*H, 2): axis 2 picks q (0) or k (1). One launch for both poolings.
    if tl.program_id(2) == 0:
        _pool_tile(q_ptr, qt_ptr, Sq, D, H, Mq, BLOCK_Q, sqb, sqh, sqs, sqd, BM, BT, BD)
    else:
        _pool_tile(k_ptr, kt_ptr, Sk, D, H, Mk, BLOCK_K, skb, skh, sks, skd, BM, BT, BD)


# ---------------------------------------------------------------------------------------------- select
@triton.jit
def _nth_by_bisection(ordered, col_ok, n):
    # The n-th largest order value of each row (n <= the row's real blocks): the largest t with
    # count(ordered >= t) >= n, by bisection over the int32 range - 32 counting passes over the row, no
    # sort. Invariant: count(>= lo) >= n (every real lane is >= -2**31) and count(>= hi) < n (nothing is
    # >= 2**31); mid stays in int32's range, so the compares run in int32.
    lo = tl.full([ordered.shape[0]], -2147483648, tl.int64)
    hi = tl.full([ordered.shape[0]], 2147483648, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        at_least = tl.sum(((ordered >= mid.to(tl.int32)[:, None]) & col_ok[None, :]).to(tl.int32), axis=1)
        lo = tl.where(at_least >= n, mid, lo)
        hi = tl.where(at_least >= n, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _nth_by_sort(ordered, col_ok, logit, Mk, n_floor, threshold_bits, THRESHOLD: tl.constexpr,
                 K: tl.constexpr):
    # The K largest order values of each row, descending (bitonic; K = BN for the threshold rule, which
    # needs the prefix masses in rank order). Returns the number of blocks to keep and the order value of
    # the last of them.
    lowest: tl.constexpr = -2147483648  # padding lanes: below every finite logit's image
    ordered = tl.where(col_ok[None, :], ordered, lowest)
    top = tl.topk(ordered, K)
    rank = tl.arange(0, K)[None, :]
    if THRESHOLD:
        # The mass to reach: threshold * total of the fp32 weights exp(logit - row max), summed in fp64.
        row_max = tl.max(tl.where(col_ok[None, :], logit, float("-inf")), axis=1)
        e = tl.where(col_ok[None, :], tl.exp(logit - row_max[:, None]), 0.0).to(tl.float64)
        threshold = threshold_bits.to(tl.float64, bitcast=True)  # passed as the fp64's bits: exact
        target = threshold * tl.sum(e, axis=1)
        # The same fp32 weights in rank order: the order value is the logit's bits, so this is exact.
        bits = top ^ ((top >> 31) & 0x7FFFFFFF)
        w = tl.exp(tl.where(rank < Mk, bits.to(tl.float32, bitcast=True), float("-inf")) - row_max[:, None])
        upto = tl.cumsum(w.to(tl.float64), axis=1)  # mass of ranks <= r = mass before rank r + 1
        # rank 0 (mass before it 0 < target) and every rank r + 1 < Mk with upto[r] < target are kept
        n = tl.maximum(n_floor, 1 + tl.sum(((upto < target[:, None]) & (rank < Mk - 1)).to(tl.int32), axis=1))
        in_top = rank < n[:, None]
    else:
        n = n_floor
        in_top = rank < n
    return n, tl.min(tl.where(in_top, top, 2147483647), axis=1)


@triton.jit
def _kept(ordered, col_ok, logit, Mk, n_floor, threshold_bits, THRESHOLD: tl.constexpr, BISECT: tl.constexpr,
          K: tl.constexpr):
    # Which blocks each row keeps: the n with the largest order values, ties to the lower index.
    if BISECT:  # the ratio rule only (the launcher's choice)
        n = n_floor
        nth = _nth_by_bisection(ordered, col_ok, n)
    else:
        n, nth = _nth_by_sort(ordered, col_ok, logit, Mk, n_floor, threshold_bits, THRESHOLD, K)
    # Blocks above the n-th value, then the lowest-indexed of those equal to it (exact ties) up to n.
    above = (ordered > nth[:, None]) & col_ok[None, :]
    tie = (ordered == nth[:, None]) & col_ok[None, :]
    free = n - tl.sum(above.to(tl.int32), axis=1)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= free[:, None]))


@triton.jit
def _topk_select_kernel(
    qt_ptr, kt_ptr, counts_ptr, out_ptr,
    Mq, Mk, D, scale, tail_log, n_floor, threshold_bits,
    THRESHOLD: tl.constexpr, BISECT: tl.constexpr, OUT_MASK: tl.constexpr, K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, DU: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    rows = i_m * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    row_ok = rows < Mq
    col_ok = cols < Mk

    # Scores [BM, BN]: rank-1 updates over the head dim, IEEE fp32 (pooled tensors are [BH, D, M]).
    q_base = qt_ptr + i_bh * D * Mq
    k_base = kt_ptr + i_bh * D * Mk
    # DU head dims per step, unrolled: their loads issue together instead of one L2 round trip each.
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, DU):
        for dd in tl.static_range(DU):
            d = d0 + dd
            qd = tl.load(q_base + d * Mq + rows, mask=row_ok & (d < D), other=0.0)
            kd = tl.load(k_base + d * Mk + cols, mask=col_ok & (d < D), other=0.0)
            acc += qd[:, None] * kd[None, :]
    logit = acc * scale
    if THRESHOLD:
        # Mass weighted by block length: only the tail block differs (softmax is shift-invariant).
        logit = logit + tl.where(cols == Mk - 1, tail_log, 0.0)[None, :]
    logit = tl.where(logit == 0.0, 0.0, logit)  # -0.0 -> +0.0: equal logits must get equal order values

    # Order-preserving int32 image of the fp32 logit (its bits, negatives' magnitude bits flipped).
    bits = logit.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    kept = _kept(ordered, col_ok, logit, Mk, n_floor, threshold_bits, THRESHOLD, BISECT, K)

    row_base = (i_bh * Mq + rows).to(tl.int64) * Mk
    io_mask = row_ok[:, None] & col_ok[None, :]
    if OUT_MASK:
        tl.store(out_ptr + row_base[:, None] + cols[None, :], kept.to(tl.uint8), mask=io_mask)
    else:
        kept_i = kept.to(tl.int32)
        count = tl.sum(kept_i, axis=1)
        before = tl.cumsum(kept_i, axis=1)  # inclusive: kept blocks up to and including j
        slot = tl.where(kept, before - 1, count[:, None] + cols[None, :] - before)
        value = tl.where(kept, cols[None, :], 0)
        tl.store(out_ptr + row_base[:, None] + slot, value, mask=io_mask)
        tl.store(counts_ptr + i_bh * Mq + rows, count, mask=row_ok)


# ---------------------------------------------------------------------------------------------- launchers
def _f64_bits(x: float) -> int:
    # Triton passes Python floats as fp32; the threshold goes as the int64 bit pattern of its fp64.
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def pool_qk_triton(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, *, block_rows: int | None = None,
                   blocks_per_program: int | None = None, num_warps: int | None = None):
    """Block means of q and k in one launch: ``[B, H, S, D]`` (any strides, dtypes) -> fp32 contiguous
    ``[B, H, D, Mq]`` and ``[B, H, D, Mk]`` (transposed; tail blocks averaged over their true length).

    ``block_rows`` (rows of each block summed per step), ``blocks_per_program`` and ``num_warps`` (powers
    of two) override the tile, for ``scripts/bench_topk_build.py --sweep``; the results do not depend on
    them beyond fp32 summation order."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mq, mk = cdiv(sq, block_q), cdiv(sk, block_kv)
    qt = torch.empty(b, h, d, mq, device=q.device, dtype=torch.float32)
    kt = torch.empty(b, h, d, mk, device=q.device, dtype=torch.float32)
    bd = triton.next_power_of_2(d)
    bm, bt = pool_tile(max(block_q, block_kv), max(mq, mk), bd)  # as mean_pool_triton
    bt = block_rows or bt
    bm = blocks_per_program or bm
    extra = {} if num_warps is None else dict(num_warps=num_warps)
    _pool_qk_kernel[(cdiv(max(mq, mk), bm), b * h, 2)](
        q, k, qt, kt, sq, sk, d, h, mq, mk, block_q, block_kv, *q.stride(), *k.stride(), BM=bm, BT=bt, BD=bd,
        **extra,
    )
    return qt, kt


def select_tile(mq: int, bn: int) -> tuple[int, int]:
    """``(query rows per program, warps)`` of the select kernel for ``bn`` (padded) key blocks per row.

    Each program reads all pooled keys of its head, so more rows per program means less L2 traffic, but
    the sort network's register tile ``[rows, bn]`` grows with it. Chosen from the H200 sweep
    (``bench_topk_build.py --sweep``, 2026-11-30; the previous rule, up to 16 rows and ~8 tile elements
    per thread, in brackets): at ``bn = 256`` (Wan-480p) 4 rows with 8 warps, 0.047 ms (0.069 ms for 16 rows
    with 16 warps) for the ratio rule and 0.058 ms (0.099) for the threshold rule; at ``bn = 1024``
    (Hunyuan-720p) 8 rows with 4 warps, 1.96 ms (2.42 for 16 warps) and 3.06 ms (4.24). Both keep ~4 tile
    elements per thread at 256 lanes, and the wide rows fewer, larger programs; the tile stays within
    ``_TILE_ELEMENTS``."""
    if bn <= 256:
        bm = 4
        warps = max(1, min(8, bm * bn // 128))
    else:
        bm = max(1, min(8, _TILE_ELEMENTS // bn))
        warps = 4
    return max(1, min(bm, triton.next_power_of_2(mq))), warps


def ratio_select_method(bn: int) -> str:
    """How the ratio rule finds each row's n-th largest score at ``bn`` (padded) key blocks: ``"sort"``
    (bitonic top-k of the order images) on short rows, ``"bisect"`` (32 counting passes) from
    :data:`BISECT_MIN_LANES` lanes. H200, 2026-11-30 (``bench_topk_build.py``, same tiles, same blocks kept):
    at 256 lanes (Wan-480p) the sort 0.062 ms against 0.079 for bisection; at 1024 lanes bisection 0.38 ms
    against 0.69 (540 key blocks, 18x48x80) and 1.04 against 1.97 (929, Hunyuan-720p) - the sort network
    grows as n log^2 n per row, the counting passes as 32 n."""
    return "bisect" if bn >= BISECT_MIN_LANES else "sort"


def topk_select_triton(
    q_t: torch.Tensor, k_t: torch.Tensor, kv_len: int, block_kv: int, scale: float, n_floor: int,
    threshold: float | None, out_mask: bool = False, *,
    block_m: int | None = None, num_warps: int | None = None, ratio_select: str = "auto",
):
    """Select from transposed pooled tensors (:func:`pool_qk_triton`): fp32 ``[B, H, D, Mq]``,
    ``[B, H, D, Mk]``. Keeps per row the longest prefix of the order (logit descending, lower index first)
    whose blocks have rank < ``n_floor`` or softmax mass before them < ``threshold`` (None: rank only).

    ``block_m`` / ``num_warps`` override the tile (query rows per program, a power of two) and the warps,
    and ``ratio_select`` (``"bisect"`` or ``"sort"``; ``"auto"``: :func:`ratio_select_method`) how the ratio
    rule finds its n-th largest score, for benchmarks and tests; both keep the same blocks.

    Returns ``(kv_counts int32 [B, H, Mq], kv_indices int32 [B, H, Mq, Mk])``, or with ``out_mask`` a bool
    ``[B, H, Mq, Mk]`` mask.
    """
    b, h, d, mq = q_t.shape
    mk = k_t.shape[3]
    bn = max(16, triton.next_power_of_2(mk))
    tile_m, tile_warps = select_tile(mq, bn)
    bm = block_m or tile_m
    num_warps = num_warps or tile_warps
    if ratio_select not in ("auto", "bisect", "sort"):
        raise ValueError(f"ratio_select must be 'auto', 'bisect' or 'sort', got {ratio_select!r}")
    if ratio_select == "auto":
        ratio_select = ratio_select_method(bn)
    # The sort of the ratio rule needs only the n_floor largest (bitonic top-k of a power of two >= n_floor,
    # and >= 2: Triton 3.6's top-1 of a single row reduces the row to a scalar and fails); the threshold
    # rule sorts the whole row for its prefix sums.
    bisect = threshold is None and ratio_select == "bisect"
    top = bn if threshold is not None or bisect else min(bn, max(2, triton.next_power_of_2(n_floor)))  # K
    tail = kv_len - block_kv * (mk - 1)
    tail_log = math.log(tail / block_kv)
    dev = q_t.device
    if out_mask:
        out = torch.empty(b, h, mq, mk, device=dev, dtype=torch.uint8)
        counts = out  # unused by the kernel in mask mode
    else:
        out = torch.empty(b, h, mq, mk, device=dev, dtype=torch.int32)
        counts = torch.empty(b, h, mq, device=dev, dtype=torch.int32)
    _topk_select_kernel[(cdiv(mq, bm), b * h)](
        q_t, k_t, counts, out, mq, mk, d, float(scale), float(tail_log), int(n_floor),
        _f64_bits(threshold if threshold is not None else 0.5),
        THRESHOLD=threshold is not None, BISECT=bisect,
        OUT_MASK=out_mask, K=top, BM=bm, BN=bn,
        DU=min(8, triton.next_power_of_2(d)), num_warps=num_warps,
    )
    if out_mask:
        return out.view(torch.bool)
    return counts, out


# ---------------------------------------------------------------------------------------------- public
def fused_topk_supported(q: torch.Tensor, num_kv_blocks: int) -> bool:
    """Whether ``TopK`` builds through :func:`topk_layout` for ``q``: CUDA or ``TRITON_INTERPRET=1``,
    Triton importable, and at most :data:`FUSED_MAX_KV_BLOCKS` key blocks (where it is the faster path;
    the kernel itself takes up to :data:`MAX_KV_BLOCKS`)."""
    return num_kv_blocks <= FUSED_MAX_KV_BLOCKS and _use_triton(q, "auto")


def _keep_rule(mk: int, ratio, threshold, min_blocks) -> tuple[int, float | None]:
    """(n_floor, threshold or None) of the kernel for TopK's rules (see the module docstring)."""
    return keep_rule(mk, ratio, threshold, min_blocks, who="topk_layout")


def _run(q, k, block_q, block_kv, ratio, threshold, min_blocks, scale, out_mask):
    _check(q, k, block_q, block_kv, "triton")
    _use_triton(q, "triton")  # raises on CPU tensors without the interpreter
    mk = cdiv(k.shape[2], block_kv)
    if mk > MAX_KV_BLOCKS:
        raise ValueError(
            f"{mk} key blocks (kv_len {k.shape[2]} / block_kv {block_kv}) exceed the fused top-k kernel's "
            f"{MAX_KV_BLOCKS}; use a larger block_kv, or block_scores + TopK.select (PyTorch selection)"
        )
    n_floor, thr = _keep_rule(mk, ratio, threshold, min_blocks)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q_t, k_t = pool_qk_triton(q, k, block_q, block_kv)
    return topk_select_triton(q_t, k_t, k.shape[2], block_kv, float(scale), n_floor, thr, out_mask)


def topk_layout(
    q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_kv: int = 128, *, ratio: float | None = None,
    threshold: float | None = None, min_blocks: int = 1, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k block layout of :class:`~dit_sparse.patterns.TopK` in two launches (pool q+k, score+select).

    Args:
        q, k: ``[B, H, Sq, D]``, ``[B, H, Sk, D]``, CUDA (or CPU under ``TRITON_INTERPRET=1``), any float
            dtype and strides.
        block_q, block_kv: tokens per query / key block (tail blocks are averaged over their length).
        ratio: keep ``max(min(min_blocks, Mk), min(Mk, ceil(ratio * Mk)))`` blocks with the highest scores.
        threshold: keep the fewest blocks whose softmax mass over ``score + log(block length)`` reaches
            ``threshold``, at least ``min_blocks`` (``threshold >= 1`` keeps all). Exactly one rule.
        min_blocks: floor on the kept count (capped by Mk).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``kv_counts`` int32 ``[B, H, Mq]`` and ``kv_indices`` int32 ``[B, H, Mq, Mk]`` (kept blocks ascending,
        then zeros), as :class:`~dit_sparse.block_layout.BlockLayout` takes them. No host sync.

    Example::

        counts, indices = topk_layout(q, k, 128, 128, ratio=0.1)
        layout = BlockLayout(counts, indices, q.shape[2], k.shape[2], 128, 128)
    """
    return _run(q, k, block_q, block_kv, ratio, threshold, min_blocks, scale, False)


def topk_block_mask(
    q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_kv: int = 128, *, ratio: float | None = None,
    threshold: float | None = None, min_blocks: int = 1, scale: float | None = None,
) -> torch.Tensor:
    """The same selection as :func:`topk_layout` as a bool block mask ``[B, H, Mq, Mk]`` (for unions of
    patterns, which OR masks before building one layout)."""
    return _run(q, k, block_q, block_kv, ratio, threshold, min_blocks, scale, True)


# ---------------------------------------------------------------------------------------------- reference
def naive_topk_layout(
    q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_kv: int = 128, *, ratio: float | None = None,
    threshold: float | None = None, min_blocks: int = 1, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable reference of :func:`topk_layout`, one row at a time in fp64 (slow; for tests).

    Pooled scores without centring, order = (logit descending, lower block index first), then the rule
    as ``TopK.select`` states it, kept blocks written ascending and zero padded.
    """
    q, k = q.double().cpu(), k.double().cpu()
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mq, mk = cdiv(sq, block_q), cdiv(sk, block_kv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n_floor, thr = _keep_rule(mk, ratio, threshold, min_blocks)
    qp = torch.stack([q[:, :, s: s + block_q].mean(2) for s in range(0, sq, block_q)], 2)
    kp = torch.stack([k[:, :, s: s + block_kv].mean(2) for s in range(0, sk, block_kv)], 2)
    lengths = [min(block_kv, sk - j * block_kv) for j in range(mk)]
    counts = torch.zeros(b, h, mq, dtype=torch.int32)
    indices = torch.zeros(b, h, mq, mk, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for i in range(mq):
                logits = [scale * float(qp[bi, hi, i] @ kp[bi, hi, j]) for j in range(mk)]
                if thr is not None:
                    logits = [x + math.log(n) for x, n in zip(logits, lengths)]
                order = sorted(range(mk), key=lambda j: (-logits[j], j))
                top = max(logits)
                weights = [math.exp(logits[j] - top) for j in order]
                total, mass, n = sum(weights), 0.0, 0
                while n < mk and (n < n_floor or (thr is not None and mass < thr * total)):
                    mass += weights[n]
                    n += 1
                kept = sorted(order[:n])
                counts[bi, hi, i] = n
                indices[bi, hi, i, :n] = torch.tensor(kept, dtype=torch.int32)
    return counts, indices
