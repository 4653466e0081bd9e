"""What the kernel tests share to compare results: the relative RMS check, and fp32 tolerances (fp32 dots
are exact on the interpreter, TF32 on a GPU)."""

from __future__ import annotations

import torch


def tol32(tol: float) -> float:
    """An fp32 tolerance of the interpreter (exact fp32 dots), widened on a GPU, where ``tl.dot`` on fp32
    inputs runs in TF32 (10-bit mantissa): 1e-5 (outputs) -> 3e-3, 1e-4 (gradients) -> 1e-2, the fp16
    tolerances."""
    if not torch.cuda.is_available():
        return tol
    return {1e-5: 3e-3, 1e-4: 1e-2}[tol]


def assert_close(name: str, ref: torch.Tensor, actual: torch.Tensor, ratio: float, floor: float = 0.0) -> None:
    """Relative RMS error ``rms(actual - ref) / max(rms(ref), floor) <= ratio`` (plus 1e-6 absolute).

    ``floor`` is the scale of the quantities the result is computed from, for results that are 0 in exact
    arithmetic but not in rounding (dK of a single key: a softmax over one key has zero gradient).
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual.double() - ref.double()).pow(2).mean().sqrt().item() if ref.numel() else 0.0
    base = ref.double().pow(2).mean().sqrt().item() if ref.numel() else 0.0
    base = max(base, floor)
    assert diff <= ratio * base + 1e-6, f"{name}: relative RMS error {diff / max(base, 1e-30):.3g} > {ratio}"
