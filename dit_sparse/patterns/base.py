"""Common interface of sparse attention patterns: :class:`PatternContext` (what a pattern is built
for), :class:`Pattern` (builds a :class:`~dit_sparse.block_layout.BlockLayout`) and :class:`UnionPattern`
(``p1 | p2``: keep a block when any member keeps it).

Patterns work in tile order (see :mod:`dit_sparse.layout`): query and key blocks are consecutive chunks
of ``block_q`` / ``block_kv`` tokens of the permuted sequence, and ``q`` / ``k`` passed to
:meth:`Pattern.build` are already permuted, ``[B, H, S, D]``.

Build cost: builds are vectorised, with a fixed number of tensor operations whatever the grid, and make
no host sync (no ``.item()`` / ``.tolist()`` / ``bool(tensor)``), so on a GPU a build is a short run of
kernel launches that never waits for the device. Patterns produce bool block masks (:meth:`Pattern._mask`)
and a union ORs its members' masks and converts to a :class:`BlockLayout` once. A union memoises the
mask of its static members (those that need no q/k) per :class:`PatternContext`, so a refresh of
``Tile3D | TopK`` recomputes only the top-k part (:meth:`UnionPattern.clear_static_cache` drops it).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..block_layout import BlockLayout
from ..layout import BlockCoords, TokenLayout, _norm_device

__all__ = ["PatternContext", "Pattern", "UnionPattern"]


@dataclass(frozen=True)
class PatternContext:
    """What a pattern is built for: the token layout, batch and head counts, block sizes and device.

    Self-attention over the whole sequence: ``q_len = kv_len = token_layout.seq_len``.
    """

    token_layout: TokenLayout
    batch: int = 1
    heads: int = 1
    block_q: int = 128
    block_kv: int = 128
    device: torch.device | str = field(default="cpu")

    def __post_init__(self):
        if not isinstance(self.token_layout, TokenLayout):
            raise ValueError(f"token_layout must be a TokenLayout, got {type(self.token_layout).__name__}")
        for name in ("batch", "heads", "block_q", "block_kv"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PatternContext.{name} must be a positive int, got {v!r}")
        object.__setattr__(self, "device", _norm_device(self.device))

    @property
    def seq_len(self) -> int:
        return self.token_layout.seq_len

    @property
    def num_q_blocks(self) -> int:
        return self.token_layout.num_blocks(self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return self.token_layout.num_blocks(self.block_kv)

    @property
    def q_coords(self) -> BlockCoords:
        return self.token_layout.block_coords(self.block_q, self.device)

    @property
    def kv_coords(self) -> BlockCoords:
        return self.token_layout.block_coords(self.block_kv, self.device)

    def layout_from_mask(self, mask: torch.Tensor) -> BlockLayout:
        """:class:`BlockLayout` from a bool block mask ``[B|1, H|1, Mq, Mk]`` (or ``[Mq, Mk]``)."""
        if mask.dim() == 2:
            mask = mask[None, None]
        return BlockLayout.from_block_mask_tensor(mask, self.seq_len, self.seq_len, self.block_q, self.block_kv)

    def check_qk(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError unless q and k are ``[batch, heads, seq_len, D]`` tensors on ``device``."""
        want = (self.batch, self.heads, self.seq_len)
        for name, x in (("q", q), ("k", k)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[:3]) != want:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{name} must be [batch, heads, seq_len, D] = [{want[0]}, {want[1]}, {want[2]}, D] in tile "
                    f"order (TokenLayout.permute), got {shape}"
                )
            if _norm_device(x.device) != self.device:
                raise ValueError(f"{name} is on {x.device} but the context on {self.device}; build on one device")
        if q.shape[3] != k.shape[3]:
            raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")


class Pattern(abc.ABC):
    """A sparse attention pattern: ``build(ctx, q, k)`` -> :class:`BlockLayout`.

    Layouts have shape ``[B|1, H|1, Mq, Mk]``: static patterns that are the same for every head return
    ``B = H = 1`` (broadcast). ``needs_qk`` patterns (dynamic ones) need the tile-ordered ``q, k``
    ``[B, H, S, D]``; static ones ignore them, and their layout must depend on the context (and the
    pattern's parameters) only: a union memoises it per context. Combine with ``|``.
    """

    #: True when :meth:`build` needs q and k.
    needs_qk: bool = False

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short identifier with the parameters in it, e.g. ``"tile3d_w3x3x3"``."""

    @abc.abstractmethod
    def _build(self, ctx: PatternContext, q: torch.Tensor | None, k: torch.Tensor | None) -> BlockLayout:
        ...

    def _mask(self, ctx: PatternContext, q: torch.Tensor | None, k: torch.Tensor | None) -> torch.Tensor:
        """bool block mask ``[B|1, H|1, Mq, Mk]`` of :meth:`build` (inputs already checked).

        Unions combine members through this. The default converts :meth:`_build`'s layout; the built-in
        patterns compute the mask directly and build their layout from it.
        """
        return self._build(ctx, q, k).to_block_mask_tensor()

    def build(self, ctx: PatternContext, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockLayout:
        """The block layout of this pattern for ``ctx``; q, k: ``[B, H, S, D]`` in tile order."""
        if not isinstance(ctx, PatternContext):
            raise ValueError(f"ctx must be a PatternContext, got {type(ctx).__name__}")
        if (q is None) != (k is None):
            raise ValueError("pass both q and k, or neither")
        if q is None and self.needs_qk:
            raise ValueError(f"pattern {self.name} is dynamic: pass q and k ([B, H, S, D], tile order) to build()")
        if q is not None:
            ctx.check_qk(q, k)
        return self._build(ctx, q, k)

    def measure(self, ctx: PatternContext, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> dict:
        """Density and attention recall of this pattern on ``q, k`` (what presets are tuned on).

        Returns ``{"name", "density", "recall"}`` (floats, means over batch and heads) plus
        ``"density_per_head"`` and ``"recall_per_head"`` (fp32 ``[B, H]``).
        """
        from .metrics import attention_recall, layout_density

        ctx.check_qk(q, k)
        layout = self.build(ctx, q, k)
        density = layout_density(layout).expand(ctx.batch, ctx.heads)
        recall = attention_recall(layout, q, k, scale=scale)
        return {
            "name": self.name,
            "density": float(density.mean()),
            "recall": float(recall.mean()),
            "density_per_head": density,
            "recall_per_head": recall,
        }

    def __or__(self, other: "Pattern") -> "UnionPattern":
        if not isinstance(other, Pattern):
            return NotImplemented
        return UnionPattern([self, other])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class UnionPattern(Pattern):
    """Keeps a key block when any member pattern keeps it (nested unions are flattened).

    Members' bool masks are ORed and converted to a layout once. The OR of the static members (those
    with ``needs_qk`` False) depends only on the :class:`PatternContext`, so it is memoised per context
    (a few recent contexts): rebuilding ``Tile3D | TopK`` on a refresh recomputes only the top-k part.
    """

    #: Contexts whose static-member mask is kept (small: one per token layout / head count in use).
    static_cache_size: int = 8

    def __init__(self, patterns):
        flat = []
        for p in patterns:
            if not isinstance(p, Pattern):
                raise ValueError(f"UnionPattern members must be Patterns, got {type(p).__name__}")
            flat.extend(p.patterns if isinstance(p, UnionPattern) else [p])
        if not flat:
            raise ValueError("UnionPattern needs at least one pattern")
        self.patterns = tuple(flat)
        self._static = tuple(p for p in flat if not p.needs_qk)
        self._dynamic = tuple(p for p in flat if p.needs_qk)
        self._static_masks: OrderedDict = OrderedDict()

    @property
    def needs_qk(self) -> bool:
        return bool(self._dynamic)

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.patterns)

    def clear_static_cache(self) -> None:
        """Forget the memoised masks of the static members (the next build recomputes them)."""
        self._static_masks.clear()

    def _static_mask(self, ctx: PatternContext) -> torch.Tensor | None:
        if not self._static:
            return None
        mask = self._static_masks.get(ctx)
        if mask is not None:
            self._static_masks.move_to_end(ctx)
            return mask
        for p in self._static:
            m = p._mask(ctx, None, None)
            mask = m if mask is None else mask | m
        self._static_masks[ctx] = mask
        while len(self._static_masks) > self.static_cache_size:
            self._static_masks.popitem(last=False)
        return mask

    def _mask(self, ctx, q, k) -> torch.Tensor:
        mask = self._static_mask(ctx)
        for p in self._dynamic:
            m = p._mask(ctx, q, k)
            mask = m if mask is None else mask | m  # out of place: the memoised static mask stays intact
        return mask

    def _build(self, ctx, q, k) -> BlockLayout:
        return ctx.layout_from_mask(self._mask(ctx, q, k))
