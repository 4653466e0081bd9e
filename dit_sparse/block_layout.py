"""Block layouts: which key blocks each query block attends to.

A :class:`BlockLayout` is the one thing the sparse kernels take. Per (batch, head, query block) it holds
a count and a list of key-block indices, exactly as FlexAttention's ``kv_num_blocks`` / ``kv_indices``:

* ``kv_counts``  int32 ``[B, H, Mq]``      - number of key blocks kept by each query block
* ``kv_indices`` int32 ``[B, H, Mq, Mk]``  - the kept key blocks, ascending, in the first
  ``kv_counts`` slots; the remaining slots are padding (any value in ``[0, Mk)``, we write 0)

with ``Mq = ceil(q_len / block_q)`` and ``Mk = ceil(kv_len / block_kv)``. ``B`` and ``H`` may be 1 to
broadcast over the batch or the heads. Memory is O(Mq * Mk) per (batch, head), never O(S^2).

Patterns build layouts, the pattern cache stores them, kernels read them. A FlexAttention
``BlockMask`` converts with :meth:`BlockLayout.from_block_mask` so masks written for FlexAttention
(attention-gym's STA / SVG / VSA masks, for example) run on our kernels unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "cdiv"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Block-sparse attention layout (see the module docstring for the tensor contract)."""

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        c, i = self.kv_counts, self.kv_indices
        if c.dim() != 3 or i.dim() != 4:
            raise ValueError(
                f"kv_counts must be [B, H, Mq] and kv_indices [B, H, Mq, Mk]; got shapes "
                f"{tuple(c.shape)} and {tuple(i.shape)}"
            )
        if c.shape != i.shape[:3]:
            raise ValueError(f"kv_counts {tuple(c.shape)} does not match kv_indices {tuple(i.shape)}[:3]")
        if c.device != i.device:
            raise ValueError(f"kv_counts is on {c.device} but kv_indices on {i.device}; move both to one device")
        if self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(f"block sizes must be positive, got block_q={self.block_q} block_kv={self.block_kv}")
        mq, mk = cdiv(self.q_len, self.block_q), cdiv(self.kv_len, self.block_kv)
        if c.shape[2] != mq:
            raise ValueError(
                f"layout has {c.shape[2]} query blocks but q_len={self.q_len} with block_q={self.block_q} "
                f"needs {mq}"
            )
        if i.shape[3] != mk:
            raise ValueError(
                f"layout has {i.shape[3]} key-block slots but kv_len={self.kv_len} with "
                f"block_kv={self.block_kv} needs {mk}"
            )

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def to(self, device) -> "BlockLayout":
        return BlockLayout(
            self.kv_counts.to(device), self.kv_indices.to(device), self.q_len, self.kv_len, self.block_q, self.block_kv
        )

    def expand(self, batch: int, heads: int) -> "BlockLayout":
        """Broadcast B=1 / H=1 layouts to ``[batch, heads]`` (a view; no copy)."""
        b, h = self.batch, self.heads
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"layout of batch {b}, heads {h} cannot broadcast to batch {batch}, heads {heads}")
        return BlockLayout(
            self.kv_counts.expand(batch, heads, -1),
            self.kv_indices.expand(batch, heads, -1, -1),
            self.q_len, self.kv_len, self.block_q, self.block_kv,
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask_tensor(
        cls, mask: torch.Tensor, q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128
    ) -> "BlockLayout":
        """Build from a boolean block mask ``[B, H, Mq, Mk]`` (True = keep that key block): each row's kept
        blocks in ascending order, then zeros.

        Sort-free (pattern builds call this on every refresh): a kept block's slot is the number of kept
        blocks before it (prefix sum); dropped blocks are scattered to a spare slot past the end, which is
        cut off. Broadcast (stride-0) masks convert too.
        """
        if mask.dim() != 4:
            raise ValueError(f"block mask must be [B, H, Mq, Mk], got shape {tuple(mask.shape)}")
        mask = mask.bool()
        mk = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        slots = torch.cumsum(mask, -1, dtype=torch.int64).sub_(1).masked_fill_(~mask, mk)
        blocks = torch.arange(mk, device=mask.device, dtype=torch.int32).expand(mask.shape)
        indices = torch.zeros(*mask.shape[:-1], mk + 1, device=mask.device, dtype=torch.int32)
        indices.scatter_(-1, slots, blocks)
        return cls(counts.contiguous(), indices[..., :mk].contiguous(), q_len, kv_len, block_q, block_kv)

    @classmethod
    def dense(
        cls, q_len: int, kv_len: int, block_q: int = 128, block_kv: int = 128, batch: int = 1, heads: int = 1,
        device=None,
    ) -> "BlockLayout":
        mq, mk = cdiv(q_len, block_q), cdiv(kv_len, block_kv)
        mask = torch.ones(batch, heads, mq, mk, dtype=torch.bool, device=device)
        return cls.from_block_mask_tensor(mask, q_len, kv_len, block_q, block_kv)

    @classmethod
    def from_block_mask(cls, block_mask) -> "BlockLayout":
        """Convert a FlexAttention ``BlockMask`` (its partial and full blocks both count as kept).

        Only the block structure is taken: a ``mask_mod`` that masks inside a partial block is not
        applied, so the result keeps every token of every listed block.
        """
        q_len, kv_len = block_mask.seq_lengths
        bq, bkv = block_mask.BLOCK_SIZE
        counts = block_mask.kv_num_blocks
        indices = block_mask.kv_indices
        mk = cdiv(kv_len, bkv)
        mq = cdiv(q_len, bq)
        keep = _mask_from_lists(counts[..., :mq], indices[..., :mq, :], mk)
        if block_mask.full_kv_num_blocks is not None:
            keep |= _mask_from_lists(
                block_mask.full_kv_num_blocks[..., :mq], block_mask.full_kv_indices[..., :mq, :], mk
            )
        return cls.from_block_mask_tensor(keep, q_len, kv_len, bq, bkv)

    # ------------------------------------------------------------------ views and algebra
    def to_block_mask_tensor(self) -> torch.Tensor:
        """Boolean ``[B, H, Mq, Mk]`` mask of kept blocks."""
        return _mask_from_lists(self.kv_counts, self.kv_indices, self.num_kv_blocks)

    def to_token_mask(self) -> torch.Tensor:
        """Boolean ``[B, H, q_len, kv_len]`` token mask. O(S^2): for references and tests only."""
        m = self.to_block_mask_tensor()
        m = m.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        return m.repeat_interleave(self.block_kv, dim=3)[:, :, :, : self.kv_len]

    def transpose(self) -> "BlockLayout":
        """The layout seen from the keys: per key block, the query blocks that attend to it (for dK/dV)."""
        m = self.to_block_mask_tensor().transpose(-1, -2)
        return BlockLayout.from_block_mask_tensor(m, self.kv_len, self.q_len, self.block_kv, self.block_q)

    def union(self, other: "BlockLayout") -> "BlockLayout":
        self._check_compatible(other)
        b, h = max(self.batch, other.batch), max(self.heads, other.heads)
        m = self.expand(b, h).to_block_mask_tensor() | other.expand(b, h).to_block_mask_tensor()
        return BlockLayout.from_block_mask_tensor(m, self.q_len, self.kv_len, self.block_q, self.block_kv)

    __or__ = union

    def _check_compatible(self, other: "BlockLayout") -> None:
        mine = (self.q_len, self.kv_len, self.block_q, self.block_kv)
        theirs = (other.q_len, other.kv_len, other.block_q, other.block_kv)
        if mine != theirs:
            raise ValueError(f"layouts differ in (q_len, kv_len, block_q, block_kv): {mine} vs {theirs}")

    def density(self) -> torch.Tensor:
        """Fraction of (query, key) token pairs kept, per (batch, head): float32 ``[B, H]``.

        Tail blocks count with their true sizes, so a dense layout has density exactly 1.
        """
        m = self.to_block_mask_tensor().float()
        rows = _block_sizes(self.q_len, self.block_q, self.device)
        cols = _block_sizes(self.kv_len, self.block_kv, self.device)
        kept = torch.einsum("bhqk,q,k->bh", m, rows, cols)
        return kept / float(self.q_len * self.kv_len)

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` with the same blocks (all kept blocks treated as full)."""
        from torch.nn.attention.flex_attention import BlockMask

        counts = self.kv_counts.contiguous()
        indices = self.kv_indices.contiguous()
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts),
            indices,
            counts,
            indices,
            BLOCK_SIZE=(self.block_q, self.block_kv),
            seq_lengths=(self.q_len, self.kv_len),
        )


def _block_sizes(length: int, block: int, device) -> torch.Tensor:
    sizes = torch.full((cdiv(length, block),), float(block), device=device)
    sizes[-1] = length - block * (sizes.numel() - 1)
    return sizes


def _mask_from_lists(counts: torch.Tensor, indices: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    slots = torch.arange(indices.shape[-1], device=indices.device)
    valid = slots < counts.unsqueeze(-1)
    mask = torch.zeros(*indices.shape[:-1], num_kv_blocks, dtype=torch.bool, device=indices.device)
    idx = torch.where(valid, indices.long(), torch.zeros_like(indices, dtype=torch.long))
    mask.scatter_(-1, idx, valid)
    # scatter_ with duplicate padding index 0 may overwrite a True at block 0 with False; redo block 0.
    mask[..., 0] = (valid & (indices == 0)).any(-1)
    return mask
