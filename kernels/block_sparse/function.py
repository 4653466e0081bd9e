"""``torch.library`` custom ops around the Triton kernels (and the Hopper Gluon forward where it applies), with
fake (meta) kernels and autograd.

* ``dit_sparse::block_sparse_fwd(q, k, v, kv_counts, kv_indices, q_counts?, q_indices?, scale, block_q,
  block_kv) -> (o, lse)``
* ``dit_sparse::block_sparse_bwd(do, dlse?, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices,
  scale, block_q, block_kv) -> (dq, dk, dv)``

The transposed layout (``q_counts`` / ``q_indices``) is an input of the forward op only so autograd can
save it: the caller computes it once per forward, when gradients are needed, and backward reuses it.
Being opaque custom ops with fake kernels, they trace under ``torch.compile(fullgraph=True)`` with no
graph break. Outputs are fresh tensors, never views of inputs.

Eager calls do not go through them: :func:`block_sparse_fwd` runs the same implementations bare (without
gradients) or through :class:`BlockSparseFunction`, a plain ``autograd.Function``, and the custom ops
only while compiling - the custom op dispatch costs more host time than the launches (``kernels/_eager.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._eager import call_kernel
from . import triton_bwd, triton_fwd
from .hopper_fwd import hopper_block_sparse_fwd, hopper_fwd_supported

__all__ = ["block_sparse_fwd", "block_sparse_fwd_op", "block_sparse_bwd_op", "BlockSparseFunction"]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("dit_sparse::block_sparse_fwd", mutates_args=(), device_types=None)
def block_sparse_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: Optional[torch.Tensor],
    q_indices: Optional[torch.Tensor],
    scale: float,
    block_q: int,
    block_kv: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``o [B, H, Sq, D]`` (q's dtype) and natural-log ``lse`` fp32 ``[B, H, Sq]``."""
    return _forward(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv)


def _forward(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv):
    """The forward both paths run: the warp-specialised Hopper kernel (``hopper_fwd.py``) where it applies,
    else the Triton kernel."""
    c = _last_dim_contiguous
    q, k, v, kv_counts, kv_indices = c(q), c(k), c(v), c(kv_counts), c(kv_indices)
    if hopper_fwd_supported(q, k, v, block_q, block_kv):
        return hopper_block_sparse_fwd(q, k, v, kv_counts, kv_indices, scale)
    return triton_fwd.block_sparse_fwd(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv)


@block_sparse_fwd_op.register_fake
def _(q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv):
    B, H, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("dit_sparse::block_sparse_bwd", mutates_args=(), device_types=None)
def block_sparse_bwd_op(
    do: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    q_counts: torch.Tensor,
    q_indices: torch.Tensor,
    scale: float,
    block_q: int,
    block_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``dq, dk, dv`` shaped like ``q, k, v``."""
    return _backward_kernels(do, dlse, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, scale,
                             block_q, block_kv)


def _backward_kernels(do, dlse, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, scale, block_q,
                      block_kv):
    """The backward both paths run."""
    c = _last_dim_contiguous
    return triton_bwd.block_sparse_bwd(
        c(do), None if dlse is None else dlse.contiguous(), c(q), c(k), c(v), c(o), lse.contiguous(),
        c(kv_counts), c(kv_indices), c(q_counts), c(q_indices), scale, block_q, block_kv,
    )


@block_sparse_bwd_op.register_fake
def _(do, dlse, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices)
    ctx.scale, ctx.block_q, ctx.block_kv = scale, block_q, block_kv


def _gradients(ctx, do, dlse, run_backward):
    q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices = ctx.saved_tensors
    if q_counts is None or q_indices is None:
        raise RuntimeError(
            "block_sparse_fwd was called without the transposed layout (q_counts / q_indices), so it "
            "cannot run backward; call it through block_sparse_attention, which passes them when "
            "gradients are needed"
        )
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = run_backward(
        do, dlse, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, ctx.scale, ctx.block_q,
        ctx.block_kv,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


def _backward(ctx, do, dlse):
    return _gradients(ctx, do, dlse, block_sparse_bwd_op)


block_sparse_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class BlockSparseFunction(torch.autograd.Function):
    """The eager twin of ``block_sparse_fwd_op`` with its autograd: same arguments, same kernels, same saved
    tensors, without torch.library's per-call dispatch. Unused output gradients stay ``None`` (an unused
    ``lse`` adds no work to the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv):
        ctx.set_materialize_grads(False)
        out = _forward(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv)
        _setup_context(ctx, (q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv), out)
        return out

    @staticmethod
    def backward(ctx, do, dlse):
        return _gradients(ctx, do, dlse, _backward_kernels)


def _forward_bare(q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale, block_q, block_kv):
    return _forward(q, k, v, kv_counts, kv_indices, scale, block_q, block_kv)


def block_sparse_fwd(q, k, v, kv_counts, kv_indices, q_counts, q_indices, scale: float, block_q: int,
                     block_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: the custom op while compiling, else :class:`BlockSparseFunction` where q, k or v needs
    gradients, else the bare kernels (``kernels/_eager.py``)."""
    return call_kernel(block_sparse_fwd_op, BlockSparseFunction, _forward_bare, q, k, v, kv_counts, kv_indices,
                       q_counts, q_indices, scale, block_q, block_kv)
