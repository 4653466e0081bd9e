"""Public entry point of block scoring: validation, defaults and backend dispatch.

``block_scores`` is what dynamic patterns (TopK), sparse-linear attention's block selection and the
pattern cache's drift check call to rank key blocks cheaply: O(S * D) to pool plus O(Mq * Mk * D) to
score, never O(S^2).
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["block_scores"]

_BACKENDS = ("auto", "triton", "torch")


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int = 128,
    block_kv: int = 128,
    scale: float | None = None,
    center_keys: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Pooled block logits for ranking key blocks per query block.

    Args:
        q: ``[B, H, Sq, D]`` queries (any float dtype, any strides).
        k: ``[B, H, Sk, D]`` keys.
        block_q, block_kv: tokens per query / key block; the tail block is averaged over its true length.
        scale: logit scale, default ``1 / sqrt(D)``.
        center_keys: subtract the mean over all keys from the pooled keys (removes the part of the
            logits shared by every key, which carries no ranking information but dominates pooled means).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch), ``"triton"``
            or ``"torch"``. An explicitly requested backend never falls back silently.

    Returns:
        fp32 ``[B, H, Mq, Mk]`` with ``Mq = ceil(Sq / block_q)``, ``Mk = ceil(Sk / block_kv)`` and
        ``out[b, h, i, j] = scale * mean(q[b, h, block i]) . (mean(k[b, h, block j]) - mean(k[b, h]))``.

    Example::

        scores = block_scores(q, k, 128, 128)          # [B, H, Mq, Mk]
        top = scores.topk(8, dim=-1).indices            # 8 key blocks per query block
    """
    _check(q, k, block_q, block_kv, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if _use_triton(q, backend):
        from .pool_score import block_scores_triton

        return block_scores_triton(q, k, block_q, block_kv, float(scale), bool(center_keys))
    from .torch_backend import block_scores_torch

    return block_scores_torch(q, k, block_q, block_kv, float(scale), bool(center_keys))


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "torch":
        return False
    if backend == "triton":
        if not (q.is_cuda or interpreted):
            raise ValueError(
                "backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before dit_sparse.kernels is "
                "imported; use backend='torch' (or 'auto') for CPU tensors"
            )
        return True
    if not (q.is_cuda or interpreted):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check(q, k, block_q, block_kv, backend) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError("q and k must be torch tensors of shape [B, H, S, D]")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, S, D]; got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim ([B, H, S, D])"
        )
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have at least one token and head dim >= 1")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k on {k.device}; move both to one device")
    for name, v in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
