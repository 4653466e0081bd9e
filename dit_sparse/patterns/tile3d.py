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

Build cost: one pass over all (tile, key block) pairs and a prefix sum over the tiles (see
:func:`_window_mask`): a fixed number of tensor operations whatever the grid and however many tiles a
block holds (small edge tiles put up to 8 tiles in a block of the Wan 480p grid with 4x4x8 tiles,
which a loop over the tiles of a block paid in kernel launches), and no host sync. The per-layout index
tables (tile coordinates, first/last tile of each block) are made once per layout and device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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
        return ctx.layout_from_mask(self._mask(ctx))

    def _mask(self, ctx: PatternContext, q=None, k=None) -> torch.Tensor:
        windows = self.per_head or (self.window,)
        if self.per_head is not None and len(windows) != ctx.heads:
            raise ValueError(f"Tile3D has {len(windows)} per-head windows but the context has {ctx.heads} heads")
        # One mask per distinct window; heads sharing a window share its mask.
        distinct = sorted(set(windows))
        tl, device = ctx.token_layout, ctx.device
        masks = [_window_mask(tl, ctx.block_q, ctx.block_kv, w, device) for w in distinct]
        if self.per_head is None:
            return masks[0][None, None]  # [1, 1, Mq, Mk]
        which = _index_tensor(tuple(distinct.index(w) for w in windows), device)
        return torch.stack(masks).index_select(0, which)[None]  # [1, H, Mq, Mk]


def _window_mask(tl, block_q: int, block_kv: int, window: tuple, device) -> torch.Tensor:
    """bool ``[Mq, Mk]`` block mask of one ``(t, h, w)`` window.

    Vectorised over all tiles at once: a fixed number of tensor operations whatever the grid (no loop
    over the tiles of a block) and no host sync:

    1. along each axis the window of a tile starts at ``clamp(c - w // 2, 0, max(n - w, 0))`` and holds
       ``min(w, n)`` tiles, so the window of tile ``a`` is a box of a fixed size;
    2. per tile ``a`` and key block ``j``: does the box of ``a`` meet the run of tiles of ``j`` (a key
       block is a contiguous run of tiles in raster order; it meets a box iff the number of box tiles
       below its end exceeds the number below its start): ``hit`` ``[T, Mk]``;
    3. a query block holds a contiguous run of tiles ``first .. stop - 1``: it keeps ``j`` iff one of
       them hits ``j``, read off a prefix sum of ``hit`` over the tiles.

    Tiles go in chunks of at most ``_CHUNK_ELEMENTS`` per ``[T, Mk]`` temporary (one chunk for the usual
    tile sizes; the chunk count depends on shapes only).
    """
    q_first, q_stop, q_has = _block_tiles(tl, block_q, device)[:3]
    _, _, k_has, k_first, k_stop = _block_tiles(tl, block_kv, device)
    grid = tl.tile_grid
    coords = _tile_coords(tl, device)  # 3 x [T, 1]
    starts = [(c - w // 2).clamp_(0, max(n - w, 0)) for c, w, n in zip(coords, window, grid)]  # 3 x [T, 1]
    sizes = [min(w, n) for w, n in zip(window, grid)]
    n_tiles, mk = coords[0].shape[0], k_has.shape[0]
    step = max(1, _CHUNK_ELEMENTS // mk)
    if step >= n_tiles:
        hit = _count_below(k_stop, starts, sizes) > _count_below(k_first, starts, sizes)  # [T, Mk]
    else:
        hit = torch.empty(n_tiles, mk, dtype=torch.bool, device=device)
        for i in range(0, n_tiles, step):
            part = [x[i:i + step] for x in starts]
            hit[i:i + step] = _count_below(k_stop, part, sizes) > _count_below(k_first, part, sizes)
    runs = F.pad(torch.cumsum(hit, 0, dtype=torch.int32), (0, 0, 1, 0))  # runs[a] = hits of tiles < a
    mask = runs[q_stop] > runs[q_first]  # some tile of the query block hits: [Mq, Mk]
    return mask.logical_and_(q_has[:, None]).logical_and_(k_has[None, :])


# Largest [tiles, Mk] temporary of _window_mask, in elements (int64: 128 MiB).
_CHUNK_ELEMENTS = 1 << 24


@functools.lru_cache(maxsize=256)
def _index_tensor(values: tuple, device) -> torch.Tensor:
    """int64 tensor of ``values`` on ``device``, made once (do not modify)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _tile_coords(tl, device) -> tuple:
    """(t, h, w) tile-grid coordinates of every tile, in raster order, each int64 ``[T, 1]``. Cached per
    (layout, device): do not modify."""
    return _raster_to_thw(torch.arange(tl.num_tiles, device=device)[:, None], tl.tile_grid)


def _raster_to_thw(ids: torch.Tensor, tile_grid) -> tuple:
    """(t, h, w) tile-grid coordinates of raster tile ids (any shape; the id past the last tile maps to the
    next t layer)."""
    _, nh, nw = tile_grid
    return ids // (nh * nw), (ids // nw) % nh, ids % nw


@functools.lru_cache(maxsize=64)
def _block_tiles(tl, block: int, device):
    """Per block (all ``[M]``): first tile id among its video tokens, last one + 1, whether it has any
    video token, and the (t, h, w) tile coordinates of the first and the stop ids (for
    :func:`_count_below`). Cached per (layout, block, device): do not modify."""
    ids = tl.tile_ids(device)
    v = tl.video_len
    starts = torch.arange(tl.num_blocks(block), device=device) * block
    has = starts < v
    first = ids[starts.clamp(max=v - 1)]
    stop = ids[(starts + block).clamp(max=v) - 1] + 1
    return first, stop, has, _raster_to_thw(first, tl.tile_grid), _raster_to_thw(stop, tl.tile_grid)


def _count_below(x, starts, sizes) -> torch.Tensor:
    """Number of tiles of the boxes (per axis: start ``[T, 1]`` and size, an int) whose raster id is below
    ``x`` (given as its (t, h, w) tile coordinates, each ``[Mk]``; ``0 <= x <= number of tiles``)
    -> int64 ``[T, Mk]``."""
    (xt, xh, xw), (t0, h0, w0), (st, sh, sw) = x, starts, sizes
    dt, dh = xt - t0, xh - h0
    full_t = dt.clamp(0, st)  # box layers entirely below x's layer
    in_t = (dt >= 0) & (dt < st)  # x's layer crosses the box
    full_h = dh.clamp(0, sh)
    in_h = (dh >= 0) & (dh < sh)
    part_w = (xw - w0).clamp_(0, sw)
    return full_t * (sh * sw) + in_t * (full_h * sw + in_h * part_w)
