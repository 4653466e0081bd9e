"""Pieces shared by the SLA Triton kernels: the feature maps phi (and their backward) and tile configs.

Feature-map ids follow ``feature_maps.FEATURE_MAPS`` (0 softmax, 1 elu+1, 2 relu). phi works on fp32
tiles ``[rows, BLOCK_D]``; ``valid`` masks padding rows (tail tokens) and padding columns (head dims
below BLOCK_D), which must contribute 0 - phi(0) is not 0 for softmax and elu+1.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["interpret_mode", "pick_configs", "prune_tiles", "phi_fwd", "phi_bwd"]


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
