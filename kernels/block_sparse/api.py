"""Public entry point: :func:`block_sparse_attention` - validation, then dispatch to a backend.

Backends: ``"triton"`` (fused kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"torch"`` (the gather implementation in :mod:`.naive`), ``"auto"`` (triton on CUDA, torch otherwise).
An explicitly requested backend that cannot run raises ``ValueError``; it never falls back silently.
"""

from __future__ import annotations

import torch

from dit_sparse.block_layout import BlockLayout

from ._common import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, interpreting
from .naive import block_sparse_attention_torch

__all__ = ["block_sparse_attention"]

_BACKENDS = ("auto", "triton", "torch")


def _as_layout(layout) -> BlockLayout:
    if isinstance(layout, BlockLayout):
        return layout
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(layout, BlockMask):
        return BlockLayout.from_block_mask(layout)
    raise ValueError(
        f"layout must be a dit_sparse.BlockLayout or a FlexAttention BlockMask, got {type(layout).__name__}"
    )


def _check_inputs(q, k, v, layout: BlockLayout, scale, validate: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use torch.float16, torch.bfloat16 or torch.float32")
    if not (q.device == k.device == v.device == layout.device):
        raise ValueError(
            f"q, k, v and the layout must be on one device, got {q.device}, {k.device}, {v.device} and "
            f"{layout.device}; move them with .to(device) / layout.to(device)"
        )
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k, v must share batch and heads, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k, v must share the head dim, got {D}, {k.shape[3]}, {v.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if (layout.q_len, layout.kv_len) != (Sq, k.shape[2]):
        raise ValueError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {Sq} and k has {k.shape[2]} "
            f"tokens; build the layout for these lengths"
        )
    if layout.batch not in (1, B) or layout.heads not in (1, H):
        raise ValueError(
            f"layout has batch {layout.batch}, heads {layout.heads}; it must match q's batch {B}, heads {H} "
            f"or be 1 to broadcast"
        )
    if layout.kv_counts.dtype != torch.int32 or layout.kv_indices.dtype != torch.int32:
        raise ValueError(
            f"layout tensors must be int32, got kv_counts {layout.kv_counts.dtype}, kv_indices "
            f"{layout.kv_indices.dtype}; build layouts with BlockLayout constructors"
        )
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if validate or layout.device.type == "cpu":
        _check_index_range(layout)


def _check_index_range(layout: BlockLayout) -> None:
    """Host-syncing checks of the lists' values (only on CPU or with ``validate=True``)."""
    counts, idx = layout.kv_counts, layout.kv_indices
    mk = layout.num_kv_blocks
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > mk):
        raise ValueError(f"kv_counts must lie in [0, {mk}] (the number of key blocks); got values outside")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= mk):
        raise ValueError(f"kv_indices must lie in [0, {mk}); got values outside - is the layout for this kv_len?")
    if mk > 1:
        kept_pair = torch.arange(1, mk, device=idx.device) < counts.unsqueeze(-1)
        if bool((kept_pair & (idx[..., 1:] <= idx[..., :-1])).any()):
            raise ValueError(
                "kv_indices must list each query block's key blocks in strictly ascending order; build the "
                "layout with BlockLayout.from_block_mask_tensor"
            )


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    if backend == "triton" and not (q.is_cuda or interpreting()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); q is on "
            f"{q.device}. Use backend='torch' or 'auto' on CPU"
        )
    return backend


def _check_triton_shapes(q: torch.Tensor, layout: BlockLayout) -> None:
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {D} is not supported by the triton backend; use one of {SUPPORTED_HEAD_DIMS}, or "
            f"backend='torch'"
        )
    for name, size in (("block_q", layout.block_q), ("block_kv", layout.block_kv)):
        if size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"{name}={size} is not supported by the triton backend; use one of {SUPPORTED_BLOCK_SIZES}, "
                f"or backend='torch'"
            )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate: bool = False,
):
    """Block-sparse attention: each query block attends only to the key blocks its layout lists.

    ``o[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h, j], j in kept blocks of i's block) @ v[b, h, j]``;
    query rows whose block keeps no key block get zeros (and ``lse = -inf``), never NaN.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Skv, D]`` - fp16, bf16 or fp32, any strides (a last dim that
            is not contiguous is copied). The triton backend supports D in (64, 96, 128).
        layout: :class:`~dit_sparse.BlockLayout` for ``(Sq, Skv)`` (batch / heads equal to B / H or 1),
            or a FlexAttention ``BlockMask`` (partial blocks count as fully kept).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``[B, H, Sq]`` (differentiable).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see the module docstring).
        validate: check the index lists' values on CUDA too (a host sync); always done on CPU.

    Returns:
        ``o`` ``[B, H, Sq, D]`` in q's dtype, or ``(o, lse)`` with ``return_lse``.

    Example::

        layout = BlockLayout.dense(q.shape[2], k.shape[2], device=q.device)
        o = block_sparse_attention(q, k, v, layout)
    """
    layout = _as_layout(layout)
    backend = _resolve_backend(backend, q)
    if not torch.compiler.is_compiling():
        _check_inputs(q, k, v, layout, scale, validate)
        if backend == "triton":
            _check_triton_shapes(q, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "torch":
        return block_sparse_attention_torch(q, k, v, layout, scale=scale, return_lse=return_lse)

    from .function import block_sparse_fwd
    from .layout_ops import cached_transpose

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_counts, kv_indices = layout.kv_counts, layout.kv_indices
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    q_counts = q_indices = None
    if needs_grad:
        q_counts, q_indices = cached_transpose(kv_counts, kv_indices, layout.num_q_blocks)
    o, lse = block_sparse_fwd(
        q, k, v, kv_counts, kv_indices, q_counts, q_indices, float(scale), layout.block_q, layout.block_kv
    )
    return (o, lse) if return_lse else o
