"""Sliding 3D tile windows (Sliding Tile Attention, https://arxiv.org/abs/2502.04507): every query tile
attends to the key tiles inside a ``(t, h, w)`` window of tiles around it.

The window is clamped at the grid edges, not cut: near an edge it slides inward, so every query tile
keeps exactly ``min(wt, NT) * min(wh, NH) * min(ww, NW)`` key tiles for any tile grid ``NT x NH x NW``,
and grids smaller than the window degrade to dense. Along an axis the window starts ``w // 2`` tiles
before the query tile (centred for odd ``w``).

Tiles to blocks: a query block keeps a key block when any tile of the query block has any tile of the
key block in its window. With one tile per block (block = tile volume) this is exactly STA; with several
tiles per block (4x4x4 tiles, block 128) or blocks cutting across tiles (edge tiles), it is the smallest
block layout that covers every token pair STA keeps. Blocks without video tokens (pure text) keep
nothing here: union with :class:`~dit_sparse.patterns.TextAlwaysOn` for text-in-sequence models.
"""

from __future__ import annotations

import torch

from ..block_layout import BlockLayout
from .base import Pattern, PatternContext

__all__ = ["Tile3D"]


def _check_window(w, what: str) -> tuple[int, int, int]:
    try:
        w = tuple(w)
    except TypeError:
        raise ValueError(f"{what} must be a (t, h, w) tuple of positive ints (tiles), got {w!r}") from None
    if len(w) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in w):
        raise ValueError(f"{what} must be a (t, h, w) tuple of positive ints (tiles), got {w!r}")
    return w


class Tile3D(Pattern):
    """Sliding 3D tile window, the same for all heads or one per head.

    Args:
        window: ``(t, h, w)`` window size in tiles (default 3x3x3).
        per_head: optional list of one window per head; overrides ``window`` and gives a layout
            ``[1, H, Mq, Mk]`` (the context must have that many heads).

    Static: ``build(ctx)`` needs no q/k. Layout ``[1, 1, Mq, Mk]`` without ``per_head``.
    """

    def __init__(self, window=(3, 3, 3), per_head=None):
        self.window = _check_window(window, "Tile3D window")
        self.per_head = None
        if per_head is not None:
            per_head = list(per_head)
            if not per_head:
                raise ValueError("Tile3D per_head must list one (t, h, w) window per head, got an empty list")
            self.per_head = tuple(_check_window(w, f"Tile3D per_head[{i}]") for i, w in enumerate(per_head))

    @property
    def name(self) -> str:
        if self.per_head is None:
            return "tile3d_w" + "x".join(map(str, self.window))
        return "tile3d_ph" + "-".join("x".join(map(str, w)) for w in self.per_head)

    def _build(self, ctx: PatternContext, q=None, k=None) -> BlockLayout:
        windows = self.per_head or (self.window,)
        if self.per_head is not None and len(windows) != ctx.heads:
            raise ValueError(f"Tile3D has {len(windows)} per-head windows but the context has {ctx.heads} heads")
        tl = ctx.token_layout
        win = torch.tensor(windows, dtype=torch.int64, device=ctx.device)  # [Hw, 3]
        q_first, q_last, q_has = _block_tiles(tl, ctx.block_q, ctx.device)
        k_first, k_last, k_has = _block_tiles(tl, ctx.block_kv, ctx.device)
        grid = tl.tile_grid
        nt, nh, nw = grid
        mask = torch.zeros(win.shape[0], q_first.numel(), k_first.numel(), dtype=torch.bool, device=ctx.device)
        # Walk the tiles of every query block in step (most blocks hold 1-2 tiles); the window of each
        # tile is a box, and a key block (a contiguous run of tiles) meets a box iff the number of box
        # tiles below its end exceeds the number below its start.
        for j in range(int((q_last - q_first).max()) + 1 if q_has.any() else 0):
            a = torch.minimum(q_first + j, q_last)  # [Mq]
            coords = (a // (nh * nw), (a // nw) % nh, a % nw)
            box = []
            for axis in range(3):
                w = win[:, axis, None]  # [Hw, 1]
                n = grid[axis]
                start = torch.clamp(coords[axis][None, :] - w // 2, min=0)
                start = torch.minimum(start, (n - w).clamp(min=0))
                box.append((start[..., None], torch.clamp(start + w, max=n)[..., None]))  # [Hw, Mq, 1]
            hit = _count_below(k_last + 1, box, nh, nw) > _count_below(k_first, box, nh, nw)
            mask |= hit
        mask &= q_has[None, :, None] & k_has[None, None, :]
        return ctx.layout_from_mask(mask[None])


def _block_tiles(tl, block: int, device):
    """Per block: first and last tile id among its video tokens, and whether it has any (all ``[M]``)."""
    ids = tl.tile_ids(device)
    v = tl.video_len
    starts = torch.arange(tl.num_blocks(block), device=device) * block
    has = starts < v
    first = ids[starts.clamp(max=v - 1)]
    last = ids[(starts + block).clamp(max=v) - 1]
    return first, last, has


def _count_below(x: torch.Tensor, box, nh: int, nw: int) -> torch.Tensor:
    """Number of tiles of ``box`` (per axis ``(start, end)``, ``[Hw, Mq, 1]``) whose raster id is < x
    (``[Mk]``, 0 <= x <= number of tiles) -> ``[Hw, Mq, Mk]``."""
    (t0, t1), (h0, h1), (w0, w1) = box
    xt, xh, xw = x // (nh * nw), (x // nw) % nh, x % nw
    bh, bw = h1 - h0, w1 - w0
    full_t = torch.minimum((xt - t0).clamp(min=0), t1 - t0)
    in_t = (xt >= t0) & (xt < t1)
    full_h = torch.minimum((xh - h0).clamp(min=0), bh)
    in_h = (xh >= h0) & (xh < h1)
    part_w = torch.minimum((xw - w0).clamp(min=0), bw)
    return full_t * bh * bw + in_t * (full_h * bw + in_h * part_w)
