"""``sparse_linear_attention``: the public SLA op - input checks, then the Triton or the PyTorch backend.

SLA (paper: "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention")
splits attention per query block: the critical key blocks listed by a :class:`~dit_sparse.BlockLayout`
get exact softmax attention, all other key blocks get linear attention.
This op returns the two parts separately; the SLA module adds them as ``o_sparse + proj(o_linear)``.
"""

from __future__ import annotations

import math
import os

import torch

from dit_sparse.block_layout import BlockLayout

from .feature_maps import FEATURE_MAPS, LINEAR_EPS

__all__ = ["sparse_linear_attention", "TRITON_HEAD_DIMS", "TRITON_BLOCK_SIZES"]

TRITON_HEAD_DIMS = (64, 96, 128)
TRITON_BLOCK_SIZES = (64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    feature_map: str = "softmax",
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse-linear attention, returned as its two parts.

    Args:
        q: ``[B, H, Sq, D]`` queries; fp16, bf16 or fp32.
        k, v: ``[B, H, Sk, D]`` keys and values, same dtype and device. ``Sq`` and ``Sk`` may differ.
        layout: the critical key blocks per query block; ``q_len == Sq``, ``kv_len == Sk``, batch and
            heads equal to q's or 1 (broadcast).
        feature_map: phi of the linear part: ``"softmax"`` (over the head dim), ``"elu"`` (elu + 1) or
            ``"relu"``.
        scale: softmax scale of the sparse part; default ``1 / sqrt(D)``.
        backend: ``"triton"`` (fused kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
            was set before dit_sparse.kernels was imported), ``"torch"`` (memory-light PyTorch, any
            device) or ``"auto"`` (triton on CUDA, torch otherwise). An explicit backend never falls back.

    Returns:
        ``(o_sparse, o_linear)``, each ``[B, H, Sq, D]`` in q's dtype. ``o_sparse`` is softmax attention
        over the critical blocks (zeros for a query block with none); ``o_linear`` is
        ``phi(q) R / (phi(q) . r + eps)`` with ``R = sum phi(k)^T v``, ``r = sum phi(k)`` over the other
        key blocks (zeros for a query block whose every block is critical). Both are differentiable in
        q, k and v.

    Example::

        layout = BlockLayout.from_block_mask_tensor(mask, S, S, 128, 128)   # mask [B, H, Mq, Mk]
        o_s, o_l = sparse_linear_attention(q, k, v, layout, feature_map="softmax")
        o = o_s + o_l @ proj_weight.T
    """
    if not torch.compiler.is_compiling():
        _check_inputs(q, k, v, layout, feature_map, scale, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    if not use_triton:
        from .naive import sparse_linear_attention_torch

        return sparse_linear_attention_torch(q, k, v, layout, feature_map, scale)
    if not torch.compiler.is_compiling():
        _check_triton(q, layout)
    from .op import sla_forward

    counts = layout.kv_counts.to(torch.int32)
    indices = layout.kv_indices.to(torch.int32)
    o_sparse, o_linear, _ = sla_forward(
        q, k, v, counts, indices, layout.block_q, layout.block_kv, feature_map, scale, LINEAR_EPS
    )
    return o_sparse, o_linear


def _check_inputs(q, k, v, layout, feature_map, scale, backend) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; use one of {_BACKENDS}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map {feature_map!r} is not supported; use one of {sorted(FEATURE_MAPS)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D]; got {shape}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim "
            "(pass [B, H, S, D]; repeat k / v heads for grouped-query attention)"
        )
    if not isinstance(layout, BlockLayout):
        raise ValueError(
            f"layout must be a dit_sparse.BlockLayout, got {type(layout).__name__}; convert a FlexAttention "
            "BlockMask with BlockLayout.from_block_mask"
        )
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {q.shape[2]} and k "
            f"{k.shape[2]} tokens; build the layout for these lengths"
        )
    if layout.batch not in (1, q.shape[0]) or layout.heads not in (1, q.shape[1]):
        raise ValueError(
            f"layout of batch {layout.batch}, heads {layout.heads} does not broadcast to q's batch "
            f"{q.shape[0]}, heads {q.shape[1]}; use 1 or the same size"
        )
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q on {q.device}; move it with layout.to(q.device)")
    for name, t in (("kv_counts", layout.kv_counts), ("kv_indices", layout.kv_indices)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"layout.{name} must be an integer tensor (int32), got {t.dtype}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def _check_triton(q, layout) -> None:
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"head_dim {d} is not supported by the Triton kernel; use {TRITON_HEAD_DIMS} or backend='torch'"
        )
    for name, blk in (("block_q", layout.block_q), ("block_kv", layout.block_kv)):
        if blk not in TRITON_BLOCK_SIZES:
            raise ValueError(
                f"layout {name}={blk} is not supported by the Triton kernel; use {TRITON_BLOCK_SIZES} or "
                "backend='torch'"
            )
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}); use backend='torch' on CPU, or set "
            "TRITON_INTERPRET=1 before importing dit_sparse.kernels to run the kernels in the Triton interpreter"
        )
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ValueError(
            "backend='triton' needs Triton; pip install 'dit-sparse[triton]' or use backend='torch'"
        ) from err
