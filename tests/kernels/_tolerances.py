"""Tolerances the kernel tests share: fp32 inputs are exact on the interpreter, TF32 on a GPU."""

from __future__ import annotations

import torch


def tol32(tol: float) -> float:
    """An fp32 tolerance of the interpreter (exact fp32 dots), widened on a GPU, where ``tl.dot`` on fp32
    inputs runs in TF32 (10-bit mantissa): 1e-5 (outputs) -> 3e-3, 1e-4 (gradients) -> 1e-2, the fp16
    tolerances."""
    if not torch.cuda.is_available():
        return tol
    return {1e-5: 3e-3, 1e-4: 1e-2}[tol]
