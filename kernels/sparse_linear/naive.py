"""Plain PyTorch sparse-linear attention: a dense O(S^2) reference and a memory-light CPU implementation.

Both compute, for a block layout that marks per query block the *critical* key blocks,

* ``o_sparse`` - exact softmax attention of each query over the keys of its critical blocks
  (a query block with no critical block gets zeros);
* ``o_linear`` - linear attention over all *other* keys:
  ``phi(q) R / (max(phi(q) . r, 0) + eps)`` with ``R = sum phi(k)^T v`` and ``r = sum phi(k)``
  over the non-critical keys (a query block with every block critical gets zeros).

:func:`sparse_linear_attention_ref` builds the token mask (O(Sq * Sk) memory) and is the readable
definition the kernels are tested against; run it in fp32 or fp64. :func:`sparse_linear_attention_torch`
is what CPU users get from ``backend="torch"``: it gathers the critical key blocks one query block at a
time and sums ``phi(K_j)^T V_j`` per key block, so memory stays O(S * D + Mq * D^2).
"""

from __future__ import annotations

import torch

from dit_sparse.block_layout import BlockLayout, cdiv

from .feature_maps import LINEAR_EPS, apply_feature_map

__all__ = ["sparse_linear_attention_ref", "sparse_linear_attention_torch"]


def sparse_linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    feature_map: str = "softmax",
    scale: float | None = None,
    eps: float = LINEAR_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked reference. q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]`` -> (o_sparse, o_linear), each
    ``[B, H, Sq, D]`` in the dtype of q. Differentiable; O(Sq * Sk) memory, for tests."""
    b, h, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    mask = layout.expand(b, h).to_token_mask().to(q.device)  # [B, H, Sq, Sk], True = critical
    empty_row = ~mask.any(-1, keepdim=True)

    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty_row, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty_row, 0.0)
    o_sparse = p @ v

    a = apply_feature_map(q, feature_map) @ apply_feature_map(k, feature_map).transpose(-1, -2)
    a = a * (~mask).to(a.dtype)
    o_linear = (a @ v) / (a.sum(-1, keepdim=True).clamp_min(0.0) + eps)
    return o_sparse, o_linear


def sparse_linear_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    feature_map: str = "softmax",
    scale: float | None = None,
    eps: float = LINEAR_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-light PyTorch implementation (same contract as :func:`sparse_linear_attention_ref`).

    Computes in fp32 (fp64 stays fp64) and returns the dtype of q. Differentiable with autograd.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out_dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    lay = layout.expand(b, h).to(q.device)
    bq, bkv = lay.block_q, lay.block_kv
    mq, mk = cdiv(sq, bq), cdiv(sk, bkv)

    # Keys padded to whole blocks: [B, H, Mk, bkv, D]; key_valid marks the real keys.
    pad = mk * bkv - sk
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, mk, bkv, d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, mk, bkv, d)
    key_valid = (torch.arange(mk * bkv, device=q.device) < sk).view(mk, bkv)

    o_sparse = _sparse_part(q, kb, vb, key_valid, lay, scale)
    o_linear = _linear_part(q, kb, vb, key_valid, lay, feature_map, eps)
    return o_sparse.to(out_dtype), o_linear.to(out_dtype)


def _sparse_part(q, kb, vb, key_valid, lay: BlockLayout, scale: float) -> torch.Tensor:
    b, h, sq, d = q.shape
    bq, bkv = lay.block_q, lay.block_kv
    outs = []
    for i in range(lay.num_q_blocks):
        qi = q[:, :, i * bq : min((i + 1) * bq, sq)]
        counts = lay.kv_counts[:, :, i].long()  # [B, H]
        cmax = int(counts.max())
        if cmax == 0:
            outs.append(torch.zeros_like(qi))
            continue
        idx = lay.kv_indices[:, :, i, :cmax].long()  # [B, H, c]
        slot_ok = torch.arange(cmax, device=q.device) < counts.unsqueeze(-1)  # [B, H, c]
        gather_idx = idx[..., None, None].expand(-1, -1, -1, bkv, d)
        kg = torch.gather(kb, 2, gather_idx)  # [B, H, c, bkv, D]
        vg = torch.gather(vb, 2, gather_idx)
        valid = (slot_ok.unsqueeze(-1) & key_valid[idx]).flatten(2)  # [B, H, c * bkv]
        s = torch.einsum("bhrd,bhcnd->bhrcn", qi, kg).flatten(3) * scale
        s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
        empty = (counts == 0)[:, :, None, None]
        s = s.masked_fill(empty, 0.0)
        p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
        outs.append(torch.einsum("bhrn,bhnd->bhrd", p, vg.flatten(2, 3)))
    return torch.cat(outs, dim=2)


def _linear_part(q, kb, vb, key_valid, lay: BlockLayout, feature_map: str, eps: float) -> torch.Tensor:
    b, h, sq, d = q.shape
    bq, mq = lay.block_q, lay.num_q_blocks
    fk = apply_feature_map(kb, feature_map) * key_valid[..., None].to(kb.dtype)  # [B, H, Mk, bkv, D]
    h_blocks = torch.einsum("bhknd,bhkne->bhkde", fk, vb)  # phi(K_j)^T V_j: [B, H, Mk, D, D]
    z_blocks = fk.sum(3)  # [B, H, Mk, D]
    # Summing the non-critical blocks directly (instead of total minus critical) avoids cancellation.
    noncrit = (~lay.to_block_mask_tensor()).to(q.dtype)  # [B, H, Mq, Mk]
    r_state = torch.einsum("bhqk,bhkde->bhqde", noncrit, h_blocks)
    r_norm = torch.einsum("bhqk,bhkd->bhqd", noncrit, z_blocks)

    fq = apply_feature_map(torch.nn.functional.pad(q, (0, 0, 0, mq * bq - sq)), feature_map)
    fq = fq.view(b, h, mq, bq, d)
    num = torch.einsum("bhqrd,bhqde->bhqre", fq, r_state)
    den = torch.einsum("bhqrd,bhqd->bhqr", fq, r_norm).clamp_min(0.0) + eps
    return (num / den.unsqueeze(-1)).reshape(b, h, mq * bq, d)[:, :, :sq]
