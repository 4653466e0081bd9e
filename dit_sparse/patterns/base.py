"""Common interface of sparse attention patterns: :class:`PatternContext` (what a pattern is built
for), :class:`Pattern` (builds a :class:`~dit_sparse.block_layout.BlockLayout`) and :class:`UnionPattern`
(``p1 | p2``: keep a block when any member keeps it).

Patterns work in tile order (see :mod:`dit_sparse.layout`): query and key blocks are consecutive chunks
of ``block_q`` / ``block_kv`` tokens of the permuted sequence, and ``q`` / ``k`` passed to
:meth:`Pattern.build` are already permuted, ``[B, H, S, D]``.
"""

from __future__ import annotations

import abc
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
    ``[B, H, S, D]``; static ones ignore them. Combine with ``|``.
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
    """Keeps a key block when any member pattern keeps it (nested unions are flattened)."""

    def __init__(self, patterns):
        flat = []
        for p in patterns:
            if not isinstance(p, Pattern):
                raise ValueError(f"UnionPattern members must be Patterns, got {type(p).__name__}")
            flat.extend(p.patterns if isinstance(p, UnionPattern) else [p])
        if not flat:
            raise ValueError("UnionPattern needs at least one pattern")
        self.patterns = tuple(flat)

    @property
    def needs_qk(self) -> bool:
        return any(p.needs_qk for p in self.patterns)

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.patterns)

    def _build(self, ctx, q, k) -> BlockLayout:
        layout = self.patterns[0].build(ctx, q, k)
        for p in self.patterns[1:]:
            layout = layout | p.build(ctx, q, k)
        return layout
