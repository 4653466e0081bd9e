"""The SLA Triton kernels as ``torch.library`` custom ops with autograd, so ``torch.compile`` traces them.

* ``dit_sparse::sla_forward``  (q, k, v, kv_counts, kv_indices, ...) -> (o_sparse, o_linear, lse)
* ``dit_sparse::sla_backward`` (do_sparse, do_linear, q, k, v, o_sparse, lse, ...) -> (dq, dk, dv)

``register_fake`` gives both ops their output shapes for tracing; ``register_autograd`` makes the forward
differentiable in q, k, v through the backward op (the layout is not differentiable; lse is an internal
output the public function drops). Triton is imported lazily, at the first call.

:func:`sla_forward` is what callers use: the custom op while compiling, else the same implementations through
:class:`SLAFunction` (a plain ``autograd.Function``) or bare without gradients, since the custom op dispatch
costs more host time than the launches (``kernels/_eager.py``).
"""

from __future__ import annotations

import torch

from .._eager import call_kernel
from .feature_maps import feature_map_id

__all__ = ["sla_forward", "sla_forward_op", "sla_backward_op", "SLAFunction"]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("dit_sparse::sla_forward", mutates_args=())
def sla_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature_map: str,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]``, layout int32 ``[B|1, H|1, Mq(, Mk)]`` ->
    (o_sparse ``[B, H, Sq, D]``, o_linear ``[B, H, Sq, D]``, lse fp32 ``[B, H, Sq]``)."""
    return _forward(q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps)


def _forward(q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps):
    from .triton_fwd import sla_forward as launch

    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return launch(
        q, k, v, kv_counts.contiguous(), kv_indices.contiguous(), block_q, block_kv,
        feature_map_id(feature_map), scale, eps,
    )


@sla_forward_op.register_fake
def _(q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps):
    b, h, sq, d = q.shape
    return torch.empty_like(q), q.new_empty(b, h, sq, d), q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("dit_sparse::sla_backward", mutates_args=())
def sla_backward_op(
    do_sparse: torch.Tensor,
    do_linear: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_sparse: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature_map: str,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``sla_forward_op`` for output gradients do_sparse / do_linear."""
    return _backward_kernels(do_sparse, do_linear, q, k, v, o_sparse, lse, kv_counts, kv_indices, block_q, block_kv,
                             feature_map, scale, eps)


def _backward_kernels(do_sparse, do_linear, q, k, v, o_sparse, lse, kv_counts, kv_indices, block_q, block_kv,
                      feature_map, scale, eps):
    from .triton_bwd import sla_backward

    do_sparse, do_linear, q, k, v = (_last_dim_contiguous(x) for x in (do_sparse, do_linear, q, k, v))
    return sla_backward(
        do_sparse, do_linear, q, k, v, o_sparse.contiguous(), lse.contiguous(),
        kv_counts.contiguous(), kv_indices.contiguous(), block_q, block_kv,
        feature_map_id(feature_map), scale, eps,
    )


@sla_backward_op.register_fake
def _(do_sparse, do_linear, q, k, v, o_sparse, lse, kv_counts, kv_indices, block_q, block_kv, feature_map,
      scale, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps = inputs
    o_sparse, _, lse = output
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, o_sparse, lse)
    ctx.config = (block_q, block_kv, feature_map, scale, eps)


def _gradients(ctx, do_sparse, do_linear, run_backward):
    q, k, v, kv_counts, kv_indices, o_sparse, lse = ctx.saved_tensors
    if do_sparse is None:
        do_sparse = torch.zeros_like(o_sparse)
    if do_linear is None:
        do_linear = torch.zeros_like(o_sparse)
    dq, dk, dv = run_backward(do_sparse, do_linear, q, k, v, o_sparse, lse, kv_counts, kv_indices, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None


def _backward(ctx, do_sparse, do_linear, _dlse):
    return _gradients(ctx, do_sparse, do_linear, sla_backward_op)


sla_forward_op.register_autograd(_backward, setup_context=_setup_context)


class SLAFunction(torch.autograd.Function):
    """The eager twin of ``sla_forward_op`` with its autograd: same arguments, kernels and saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps):
        ctx.set_materialize_grads(False)
        out = _forward(q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps)
        _setup_context(ctx, (q, k, v, kv_counts, kv_indices, block_q, block_kv, feature_map, scale, eps), out)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, do_sparse, do_linear, _dlse):
        return _gradients(ctx, do_sparse, do_linear, _backward_kernels)


def sla_forward(q, k, v, kv_counts, kv_indices, block_q: int, block_kv: int, feature_map: str, scale: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o_sparse, o_linear, lse)`` of ``sla_forward_op``, called as ``kernels/_eager.py`` chooses."""
    return call_kernel(sla_forward_op, SLAFunction, _forward, q, k, v, kv_counts, kv_indices, block_q, block_kv,
                       feature_map, scale, eps)
