"""Choose how a kernel pair with a ``torch.library`` custom op is called.

Every kernel with a backward is registered as a custom op (with a fake kernel and autograd), so
``torch.compile(fullgraph=True)`` traces it without a graph break. In eager mode that op's dispatch -
argument default filling, alias checks, the autograd wrapper - costs more host time than the kernels' own
launches (about 0.3 ms of a block-sparse forward + backward's 0.6 ms on one CI core, kernels stubbed out),
and at small shapes host time, not the GPU, sets the pace. So eager calls run the same implementation
through a plain ``torch.autograd.Function`` when gradients are needed, and bare otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["call_kernel"]


def call_kernel(op: Callable, function: type[torch.autograd.Function], bare: Callable, *args):
    """``op(*args)`` while compiling; else ``function.apply(*args)`` when a tensor argument needs gradients,
    else ``bare(*args)``. All three take the same arguments and return the same outputs."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return bare(*args)
