"""Spatial / temporal heads (Sparse VideoGen, https://arxiv.org/abs/2502.01776): in video DiTs some heads
attend within a frame (spatial heads), others to the same place across frames (temporal heads).

* spatial mask: a query block keeps the key blocks of its own frame group(s). Frames are grouped in runs
  of ``spatial_frames``; groups within ``temporal_radius`` of the query's groups are kept too.
* temporal mask: a query block keeps the key blocks, in every frame, whose (h, w) extent overlaps its
  own, widened by ``spatial_radius`` tokens.

Block extents are the min/max grid coordinates of their video tokens (:meth:`TokenLayout.block_coords`);
a block that wraps to the next tile row has a wide extent, so the masks may keep a little more than the
ideal per-token ones, never less. Pure-text blocks keep nothing here (union with ``TextAlwaysOn``).

Which head is which is decided per (batch, head), as Sparse VideoGen does: a few query rows are sampled,
their dense softmax is computed against all keys, and the head takes the mask that keeps more of the
sampled attention mass. :meth:`SpatioTemporal.classify` exposes the decision.

Build cost: the two candidate masks and the sampled rows depend only on the context, so they are made
once per context and kept; a build computes the sampled rows' softmax mass per key block against all keys
and picks per head, with no host sync. Where Triton runs that is one launch
(``kernels/block_score/sampled_mass.py``: per key block the tile's maximum and exponential sum, no
``[B, H, n, S]`` logits in memory); otherwise one GEMM on the inputs' dtype with fp32 output, the softmax
and a block reduction (the reference).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..block_layout import BlockLayout
from .base import Pattern, PatternContext

__all__ = ["SpatioTemporal", "HeadClassification"]


@dataclass(frozen=True)
class HeadClassification:
    """Result of :meth:`SpatioTemporal.classify`, all ``[B, H]``.

    * ``is_temporal``: bool, True for temporal heads, False for spatial heads
    * ``spatial_recall`` / ``temporal_recall``: fp32 mean softmax mass of the sampled rows kept by each mask
    """

    is_temporal: torch.Tensor
    spatial_recall: torch.Tensor
    temporal_recall: torch.Tensor

    def labels(self) -> list[list[str]]:
        """``"spatial"`` / ``"temporal"`` per batch, per head."""
        return [["temporal" if t else "spatial" for t in row] for row in self.is_temporal.tolist()]


def _nonneg_int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"SpatioTemporal {what} must be an int >= 0, got {v!r}")
    return v


class SpatioTemporal(Pattern):
    """Spatial or temporal mask per (batch, head), chosen from sampled queries.

    Args:
        spatial_frames: frames per spatial group (1: each frame alone).
        temporal_radius: spatial heads also keep groups up to this many groups away.
        spatial_radius: temporal heads' (h, w) overlap is widened by this many tokens.
        num_samples: query rows sampled (among video tokens) to classify heads.
        seed: seed of the row sampling (the same rows for every head; deterministic).

    Dynamic: ``build(ctx, q, k)`` needs q, k ``[B, H, S, D]`` in tile order; layout ``[B, H, Mq, Mk]``.
    The last classification made by :meth:`build` stays in :attr:`last_classification`.
    """

    needs_qk = True

    def __init__(self, spatial_frames: int = 1, temporal_radius: int = 0, spatial_radius: int = 0,
                 num_samples: int = 64, seed: int = 0):
        if not isinstance(spatial_frames, int) or isinstance(spatial_frames, bool) or spatial_frames <= 0:
            raise ValueError(f"SpatioTemporal spatial_frames must be a positive int, got {spatial_frames!r}")
        self.spatial_frames = spatial_frames
        self.temporal_radius = _nonneg_int(temporal_radius, "temporal_radius")
        self.spatial_radius = _nonneg_int(spatial_radius, "spatial_radius")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
            raise ValueError(f"SpatioTemporal num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.last_classification: HeadClassification | None = None
        self._memo: OrderedDict = OrderedDict()

    @property
    def name(self) -> str:
        return (f"spatiotemporal_f{self.spatial_frames}_tr{self.temporal_radius}"
                f"_sr{self.spatial_radius}_n{self.num_samples}")

    # ------------------------------------------------------------------ candidate masks
    def spatial_mask(self, ctx: PatternContext) -> torch.Tensor:
        """bool ``[Mq, Mk]``: key blocks sharing a frame group (+/- ``temporal_radius`` groups)."""
        qc, kc = ctx.q_coords, ctx.kv_coords
        f, r = self.spatial_frames, self.temporal_radius
        q_lo, q_hi = (qc.t_min // f)[:, None] - r, (qc.t_max // f)[:, None] + r
        k_lo, k_hi = (kc.t_min // f)[None, :], (kc.t_max // f)[None, :]
        keep = (k_lo <= q_hi) & (k_hi >= q_lo)
        return keep & qc.has_video[:, None] & kc.has_video[None, :]

    def temporal_mask(self, ctx: PatternContext) -> torch.Tensor:
        """bool ``[Mq, Mk]``: key blocks in any frame whose (h, w) extent meets the query's."""
        qc, kc = ctx.q_coords, ctx.kv_coords
        r = self.spatial_radius
        keep = qc.has_video[:, None] & kc.has_video[None, :]
        for lo, hi in (("h_min", "h_max"), ("w_min", "w_max")):
            q_lo, q_hi = getattr(qc, lo)[:, None] - r, getattr(qc, hi)[:, None] + r
            keep &= (getattr(kc, lo)[None, :] <= q_hi) & (getattr(kc, hi)[None, :] >= q_lo)
        return keep

    def _candidates(self, ctx: PatternContext):
        """(spatial, temporal) masks of ``ctx`` plus, for the sampled rows, the float ``[2, n, Mk]`` masks
        of their query blocks; they depend on ``ctx`` and the parameters only, so they are memoised
        (a few recent contexts). Do not modify."""
        key = (ctx, self.spatial_frames, self.temporal_radius, self.spatial_radius, self.num_samples, self.seed)
        got = self._memo.get(key)
        if got is None:
            spatial, temporal = self.spatial_mask(ctx), self.temporal_mask(ctx)
            rows = _sampled_rows(ctx.token_layout.video_len, self.num_samples, self.seed, ctx.device)
            q_blocks = rows // ctx.block_q
            per_row = torch.stack([spatial[q_blocks], temporal[q_blocks]]).float()  # [2, n, Mk]
            got = (spatial, temporal, rows, per_row)
            self._memo[key] = got
            while len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(key)
        return got

    # ------------------------------------------------------------------ classification
    def classify(self, ctx: PatternContext, q: torch.Tensor, k: torch.Tensor,
                 scale: float | None = None) -> HeadClassification:
        """Spatial or temporal, per (batch, head), from sampled rows of dense attention.

        q, k: ``[B, H, S, D]`` tile order. Cost O(num_samples * S) per head, never O(S^2). The softmax
        mass of each sampled row is summed per key block, then over the blocks each mask keeps.
        """
        ctx.check_qk(q, k)
        return self._classify(ctx, q, k, scale)

    def _classify(self, ctx: PatternContext, q, k, scale=None) -> HeadClassification:
        _, _, rows, per_row = self._candidates(ctx)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        mass = _sampled_block_mass(q[:, :, rows], k, scale, ctx.block_kv)  # fp32 [B, H, n, Mk]
        recalls = (mass.unsqueeze(0) * per_row[:, None, None]).sum(-1).mean(-1)  # [2, B, H]
        return HeadClassification(recalls[1] > recalls[0], recalls[0], recalls[1])

    def _sample_rows(self, ctx: PatternContext) -> torch.Tensor:
        return _sampled_rows(ctx.token_layout.video_len, self.num_samples, self.seed, ctx.device)

    def _mask(self, ctx: PatternContext, q, k) -> torch.Tensor:
        spatial, temporal = self._candidates(ctx)[:2]
        cls = self._classify(ctx, q, k)
        self.last_classification = cls
        return torch.where(cls.is_temporal[:, :, None, None], temporal, spatial)

    def _build(self, ctx: PatternContext, q, k) -> BlockLayout:
        return ctx.layout_from_mask(self._mask(ctx, q, k))


# Contexts whose candidate masks one SpatioTemporal keeps.
_MEMO_SIZE = 8


@functools.lru_cache(maxsize=64)
def _sampled_rows(video_len: int, num_samples: int, seed: int, device: torch.device) -> torch.Tensor:
    """The sampled query rows (sorted video token indices) on ``device``, drawn once per (length, count,
    seed, device) from a seeded CPU generator. Do not modify."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(video_len, generator=g)[:num_samples]
    return rows.sort().values.to(device)


def _sampled_block_mass(q_rows: torch.Tensor, k: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """Softmax mass of ``scale * q_rows @ k^T`` per block of ``block`` keys, fp32 ``[B, H, n, Mk]``: one
    Triton launch where Triton runs (``kernels/block_score/sampled_mass.py``: no ``[B, H, n, S]`` logits in
    memory), else :func:`_sampled_logits` then :func:`_block_softmax_mass` (its reference)."""
    from ..kernels.block_score.api import _use_triton

    if _use_triton(q_rows, "auto"):
        from ..kernels.block_score.sampled_mass import sampled_block_mass_triton

        return sampled_block_mass_triton(q_rows, k, scale, block)
    return _block_softmax_mass(_sampled_logits(q_rows, k, scale), block)


def _sampled_logits(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 ``scale * q_rows @ k^T``: ``[B, H, n, D] x [B, H, S, D] -> [B, H, n, S]``. Half-precision CUDA
    inputs multiply on the tensor cores with fp32 output (no fp32 copy of k: that copy and an fp32 GEMM were
    most of a build's time at Wan-480p), the scale folded into the few sampled rows (one rounding of q's
    dtype) instead of a pass over the logits; others in fp32."""
    b, h, n, d = q_rows.shape
    if q_rows.is_cuda and q_rows.dtype in (torch.bfloat16, torch.float16) and k.dtype == q_rows.dtype:
        rows = (q_rows.float() * scale).to(q_rows.dtype)
        out = torch.bmm(rows.reshape(b * h, n, d), k.reshape(b * h, -1, d).transpose(1, 2),
                        out_dtype=torch.float32)
        return out.view(b, h, n, -1)
    return (q_rows.float() @ k.float().transpose(-1, -2)).mul_(scale)


def _block_softmax_mass(logits: torch.Tensor, block: int) -> torch.Tensor:
    """The softmax of ``logits`` over the last dim, summed over consecutive blocks of ``block`` entries (the
    tail block is shorter)."""
    x = torch.softmax(logits, dim=-1)
    s = x.shape[-1]
    full = s // block
    head = x[..., : full * block].unflatten(-1, (full, block)).sum(-1)
    if full * block == s:
        return head
    return torch.cat([head, x[..., full * block:].sum(-1, keepdim=True)], -1)
