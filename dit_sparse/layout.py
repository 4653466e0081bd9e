"""Token layout of a video DiT: the patchified ``frames x height x width`` grid plus text tokens, and the
permutation that puts tokens into 3D-tile order so that attention blocks are compact 3D regions.

Original order (what the model produces)::

    text_first=False:  [video tokens in (t, h, w) raster order] [text tokens]     (HunyuanVideo)
    text_first=True:   [text tokens] [video tokens in (t, h, w) raster order]     (CogVideoX, Flux)

Tile order (what patterns and kernels see)::

    [video tokens grouped by 3D tile] [all text tokens]

Video tokens are grouped by tiles of ``tile = (tt, th, tw)`` tokens; tiles come in (t, h, w) raster order
over the tile grid and tokens inside a tile are row-major (t, then h, then w). When a grid dimension is
not a multiple of the tile, the last tile along that axis is smaller: no padding, never an error. Text
tokens always come last, whatever ``text_first`` says, so they form their own trailing blocks.

Blocks and tiles: attention blocks are consecutive chunks of ``block_size`` tokens in tile order. When
the tile volume divides the block size and the tiles are full (grid dims multiples of the tile), a block
is exactly a set of whole consecutive tiles: with the default block of 128, a 4x4x8 or 2x8x8 tile fills
one block, a 4x4x4 tile gives two tiles per block (neighbours along w, or wrapping to the next tile row).
Otherwise blocks cut across tile boundaries; :meth:`TokenLayout.block_coords` tells what each block holds.

Example (Wan 2.1 480p, 81 frames, 4x4x4 tiles)::

    tl = TokenLayout(21, 30, 52)
    q_tiled = tl.permute(q, dim=2)        # q: [B, H, S, D]
    out = tl.unpermute(attn(q_tiled, ...), dim=2)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["TokenLayout", "BlockCoords"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockCoords:
    """Per-block summary of a :class:`TokenLayout` cut into blocks of ``block_size`` tokens (tile order).

    All tensors have length ``num_blocks = ceil(seq_len / block_size)``. Coordinates are in token units
    of the video grid and describe only the video tokens of a block; a block without video tokens
    (pure text) has ``n_video == 0``, min/max ``-1`` and mean ``-1.0``.

    * ``t_min, t_max, h_min, h_max, w_min, w_max``: int64 ``[M]``
    * ``t_mean, h_mean, w_mean``: float32 ``[M]``
    * ``n_video``: int64 ``[M]`` number of video tokens in the block
    * ``is_text``: bool ``[M]`` the block holds at least one text token
    """

    block_size: int
    t_min: torch.Tensor
    t_max: torch.Tensor
    t_mean: torch.Tensor
    h_min: torch.Tensor
    h_max: torch.Tensor
    h_mean: torch.Tensor
    w_min: torch.Tensor
    w_max: torch.Tensor
    w_mean: torch.Tensor
    n_video: torch.Tensor
    is_text: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.n_video.numel()

    @property
    def has_video(self) -> torch.Tensor:
        """bool ``[M]``: the block holds at least one video token."""
        return self.n_video > 0


@dataclass(frozen=True)
class TokenLayout:
    """Token grid of a video DiT after patchify, plus text tokens (see the module docstring).

    Args:
        frames, height, width: latent grid after patchify, e.g. Wan 480p ``21x30x52``, HunyuanVideo 720p
            ``33x45x80``, LTX-Video 768x512 ``7x16x24``; ``frames=1`` for images (Flux).
        text_len: number of text tokens inside the attention sequence (0 when text enters by
            cross-attention, as in Wan).
        text_first: True when text tokens come before the video tokens in the model's sequence.
        tile: ``(t, h, w)`` tile size in tokens.

    Frozen and hashable: usable as a cache key. Permutation tables are built once per (layout, device).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False
    tile: tuple[int, int, int] = (4, 4, 4)

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TokenLayout.{name} must be a positive int, got {v!r}")
        if not isinstance(self.text_len, int) or isinstance(self.text_len, bool) or self.text_len < 0:
            raise ValueError(f"TokenLayout.text_len must be an int >= 0, got {self.text_len!r}")
        bad_tile = f"TokenLayout.tile must be a (t, h, w) tuple of positive ints, got {self.tile!r}"
        try:
            tile = tuple(self.tile)
        except TypeError:
            raise ValueError(bad_tile) from None
        if len(tile) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in tile):
            raise ValueError(bad_tile)
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "text_first", bool(self.text_first))

    # ------------------------------------------------------------------ sizes
    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tile_grid(self) -> tuple[int, int, int]:
        """Number of tiles along (t, h, w); edge tiles may be smaller than ``tile``."""
        return tuple(_cdiv(n, t) for n, t in zip(self.grid, self.tile))

    @property
    def num_tiles(self) -> int:
        nt, nh, nw = self.tile_grid
        return nt * nh * nw

    def num_blocks(self, block_size: int) -> int:
        _check_block(block_size)
        return _cdiv(self.seq_len, block_size)

    # ------------------------------------------------------------------ permutation
    @property
    def perm(self) -> torch.Tensor:
        """int64 ``[S]`` on CPU: ``tile_order[i] = original[perm[i]]``."""
        return self.perm_on("cpu")

    @property
    def inv_perm(self) -> torch.Tensor:
        """int64 ``[S]`` on CPU: ``original[j] = tile_order[inv_perm[j]]``."""
        return self.inv_perm_on("cpu")

    def perm_on(self, device) -> torch.Tensor:
        """:attr:`perm` on ``device`` (cached; do not modify the returned tensor)."""
        return _perm_tables(self, _norm_device(device))[0]

    def inv_perm_on(self, device) -> torch.Tensor:
        """:attr:`inv_perm` on ``device`` (cached; do not modify the returned tensor)."""
        return _perm_tables(self, _norm_device(device))[1]

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Original token order -> tile order along ``dim`` (size ``seq_len``), e.g. ``[B, S, C]`` with
        ``dim=1`` or ``[B, H, S, D]`` with ``dim=2``. Returns a new tensor of the same shape."""
        dim = self._check_dim(x, dim)
        return x.index_select(dim, self.perm_on(x.device))

    def unpermute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Tile order -> original token order along ``dim``; exact inverse of :meth:`permute`."""
        dim = self._check_dim(x, dim)
        return x.index_select(dim, self.inv_perm_on(x.device))

    def _check_dim(self, x: torch.Tensor, dim: int) -> int:
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"tensor has {x.shape[dim]} tokens along dim {dim} but the layout has seq_len={self.seq_len} "
                f"({self.frames}x{self.height}x{self.width} video + {self.text_len} text); pass the token dim"
            )
        return dim

    # ------------------------------------------------------------------ coordinates
    def video_coords(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, h, w) int64 ``[video_len]`` grid coordinates of the video tokens, in tile order."""
        return _video_coords(self, _norm_device(device))

    def tile_ids(self, device="cpu") -> torch.Tensor:
        """int64 ``[video_len]``: raster index of the tile holding each video token, in tile order
        (non-decreasing: tiles are contiguous runs of tokens)."""
        return _tile_ids(self, _norm_device(device))

    def block_coords(self, block_size: int = 128, device="cpu") -> BlockCoords:
        """Per-block coordinates for blocks of ``block_size`` consecutive tokens in tile order.

        See :class:`BlockCoords`. Cached per (layout, block size, device).
        """
        _check_block(block_size)
        return _block_coords(self, block_size, _norm_device(device))


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block size must be a positive int, got {block_size!r}")


def _norm_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=64)
def _video_perm_cpu(layout: TokenLayout) -> torch.Tensor:
    """Original video index (raster t, h, w) of each video token in tile order."""
    f, h, w = layout.grid
    tt, th, tw = layout.tile
    _, nh, nw = layout.tile_grid
    t_idx = torch.arange(f).view(f, 1, 1)
    h_idx = torch.arange(h).view(1, h, 1)
    w_idx = torch.arange(w).view(1, 1, w)
    tile_id = ((t_idx // tt) * nh + (h_idx // th)) * nw + (w_idx // tw)
    # Row-major position inside a full tile; in an edge tile it keeps the same relative order.
    local = ((t_idx % tt) * th + (h_idx % th)) * tw + (w_idx % tw)
    key = (tile_id * (tt * th * tw) + local).reshape(-1)
    return torch.argsort(key)


@functools.lru_cache(maxsize=64)
def _perm_tables(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    video = _video_perm_cpu(layout)
    if layout.text_first:
        perm = torch.cat([video + layout.text_len, torch.arange(layout.text_len)])
    else:
        perm = torch.cat([video, torch.arange(layout.video_len, layout.seq_len)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm.to(device), inv.to(device)


@functools.lru_cache(maxsize=64)
def _video_coords(layout: TokenLayout, device: torch.device):
    v = _video_perm_cpu(layout)
    _, h, w = layout.grid
    coords = (v // (h * w), (v // w) % h, v % w)
    return tuple(c.to(device) for c in coords)


@functools.lru_cache(maxsize=64)
def _tile_ids(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    t, h, w = _video_coords(layout, torch.device("cpu"))
    tt, th, tw = layout.tile
    _, nh, nw = layout.tile_grid
    return (((t // tt) * nh + (h // th)) * nw + (w // tw)).to(device)


@functools.lru_cache(maxsize=64)
def _block_coords(layout: TokenLayout, block: int, device: torch.device) -> BlockCoords:
    s, nv = layout.seq_len, layout.video_len
    m = _cdiv(s, block)
    is_video = torch.zeros(m * block, dtype=torch.bool)
    is_video[:nv] = True
    is_video = is_video.view(m, block)
    is_text = torch.zeros(m * block, dtype=torch.bool)
    is_text[nv:s] = True
    n_video = is_video.sum(1)
    has = n_video > 0
    out = {}
    for name, c in zip("thw", _video_coords(layout, torch.device("cpu"))):
        full = torch.zeros(m * block, dtype=torch.int64)
        full[:nv] = c
        full = full.view(m, block)
        big = torch.iinfo(torch.int64).max
        cmin = torch.where(is_video, full, torch.full_like(full, big)).amin(1)
        cmax = torch.where(is_video, full, torch.full_like(full, -1)).amax(1)
        mean = (full * is_video).sum(1).float() / n_video.clamp(min=1).float()
        out[f"{name}_min"] = torch.where(has, cmin, torch.full_like(cmin, -1)).to(device)
        out[f"{name}_max"] = cmax.to(device)
        out[f"{name}_mean"] = torch.where(has, mean, torch.full_like(mean, -1.0)).to(device)
    return BlockCoords(
        block_size=block,
        n_video=n_video.to(device),
        is_text=is_text.view(m, block).any(1).to(device),
        **out,
    )
