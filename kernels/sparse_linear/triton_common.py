"""Pieces shared by the SLA Triton kernels: the feature maps phi (and their backward), the load of one
block's linear state, a query block's linear output, and tile configs.

Feature-map ids follow ``feature_maps.FEATURE_MAPS`` (0 softmax, 1 elu+1, 2 relu). phi works on fp32
tiles ``[rows, BLOCK_D]``; ``valid`` masks padding rows (tail tokens) and padding columns (head dims
below BLOCK_D), which must contribute 0 - phi(0) is not 0 for softmax and elu+1.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "interpret_mode", "pick_configs", "prune_tiles", "row_tile", "phi_fwd", "phi_bwd", "linear_state",
    "linear_rows",
]


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(gpu_configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """Autotune candidates: the GPU list, or exactly one config under the Triton interpreter (the
    autotuner cannot benchmark several configs without a GPU driver)."""
    return [interpret_config] if interpret_mode() else gpu_configs


def prune_tiles(configs, named_args, **kwargs):
    """Drop configs whose tiles exceed the layout blocks or the head dim (all powers of two, so a tile
    no larger than its block divides it)."""
    args = {**named_args, **kwargs}
    limits = {"BLOCK_M": args.get("BLOCK_Q"), "BLOCK_N": args.get("BLOCK_KV"), "BLOCK_DV": args.get("BLOCK_D")}
    keep = [
        c for c in configs
        if all(lim is None or c.kwargs.get(name, 0) <= lim for name, lim in limits.items())
    ]
    return keep or configs[-1:]


@triton.jit
def row_tile(H, BLOCK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Where a program of a ``(row blocks, B * H)`` grid works: ``(pid_r, pid_bh, b, h, offs_r, offs_d)`` -
    its row block and (batch x head) ids, batch and head as int64, its ``BLOCK`` row offsets and the
    ``HEAD_DIM_PAD`` column offsets."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return pid_r, pid_bh, b, h, pid_r * BLOCK + tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM_PAD)


@triton.jit
def phi_fwd(x, valid, FEATURE_MAP: tl.constexpr):
    """phi(x) of an fp32 tile [R, C] over its columns; zero where ``valid`` is False."""
    if FEATURE_MAP == 0:
        xm = tl.where(valid, x, float("-inf"))
        row_max = tl.max(xm, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows with no valid column
        e = tl.exp(xm - row_max[:, None])
        total = tl.sum(e, 1)
        total = tl.where(total == 0.0, 1.0, total)
        y = e / total[:, None]
    elif FEATURE_MAP == 1:
        # exp of the clamped value: the unused branch must not overflow (inf * 0 = NaN in backward).
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        y = tl.maximum(x, 0.0)
    return tl.where(valid, y, 0.0)


@triton.jit
def phi_bwd(x, y, dy, valid, FEATURE_MAP: tl.constexpr):
    """d loss / d x from dy = d loss / d phi(x), with y = phi(x) as returned by ``phi_fwd``."""
    if FEATURE_MAP == 0:
        dx = y * (dy - tl.sum(dy * y, 1)[:, None])
    elif FEATURE_MAP == 1:
        dx = dy * tl.where(x > 0, 1.0, y)
    else:
        dx = tl.where(x > 0, dy, 0.0)
    return tl.where(valid, dx, 0.0)


@triton.jit
def linear_state(LIN_R, LIN_Z, st, offs_d, HEAD_DIM: tl.constexpr):
    """One block's linear state ``(R, r)``: entry ``st`` (int64) of contiguous ``LIN_R [*, D, D]`` and fp32
    ``LIN_Z [*, D]``, as ``[D_PAD, D_PAD]`` in LIN_R's dtype and fp32 ``[D_PAD]``, zero in padded head-dim
    rows / columns. ``R_i`` / ``r_i`` of a query block (linear output, linear dq) or ``dH_j`` / ``dz_j`` of
    a key block (linear dk / dv)."""
    d_ok = offs_d < HEAD_DIM
    r = tl.load(LIN_Z + st * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    rs = tl.load(LIN_R + st * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    return rs, r


@triton.jit
def linear_rows(
    q, OL, LIN_R, LIN_Z, pid_bh, pid_m, q_len, eps, offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, FEATURE_MAP: tl.constexpr,
):
    """Sparse-linear attention's linear output of one query block from its query tile ``q``
    (``[BLOCK_M, D_PAD]``, zero past ``q_len`` and in padded columns):
    ``o_l = phi(q) R_i / (max(phi(q) . r_i, 0) + eps)`` with this block's complement states ``R_i`` (zero
    when the block keeps every key block, so its rows come out 0) and ``r_i``, written to OL (contiguous
    ``[B*H, Sq, D]``, rows past ``q_len`` left alone). One MMA per query block."""
    valid = (offs_m < q_len)[:, None] & (offs_d[None, :] < HEAD_DIM)
    f = phi_fwd(q.to(tl.float32), valid, FEATURE_MAP)
    rs, r = linear_state(LIN_R, LIN_Z, pid_bh.to(tl.int64) * tl.cdiv(q_len, BLOCK_M) + pid_m, offs_d, HEAD_DIM)
    den = tl.maximum(tl.sum(f * r[None, :], 1), 0.0) + eps
    o_l = tl.dot(f.to(rs.dtype), rs) * (1.0 / den)[:, None]
    ol_ptrs = OL + pid_bh.to(tl.int64) * q_len * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ol_ptrs, o_l.to(OL.dtype.element_ty), mask=valid)
