"""Feature maps phi of the linear-attention branch of SLA, in PyTorch, and their names.

The linear branch scores a (query, key) pair with ``phi(q) . phi(k)``, so phi must be non-negative for
the normaliser ``phi(q) . sum phi(k)`` to be a sum of non-negative terms. phi acts on the head dimension
of one token at a time:

* ``"softmax"`` - softmax over the head dimension
* ``"elu"``     - elu(x) + 1 (written as ``x + 1`` for x > 0 and ``exp(x)`` otherwise, which is the same
  function without the ``exp(x) - 1 + 1`` round trip)
* ``"relu"``    - max(x, 0)

The Triton kernels implement the same maps in ``triton_common.py``; the ids below are their
compile-time switch.
"""

from __future__ import annotations

import torch

__all__ = ["FEATURE_MAPS", "LINEAR_EPS", "feature_map_id", "apply_feature_map"]

# Name -> the id the Triton kernels branch on.
FEATURE_MAPS = {"softmax": 0, "elu": 1, "relu": 2}

# Added to the linear branch's normaliser phi(q) . sum phi(k): keeps rows whose normaliser is zero
# (every key block critical, or relu features with disjoint support) at output 0 instead of NaN.
LINEAR_EPS = 1e-6


def feature_map_id(name: str) -> int:
    """The kernel id of feature map ``name``; ValueError for unknown names."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map {name!r} is not supported; use one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) over the last dimension of ``x`` (any shape ``[..., D]``); differentiable."""
    feature_map_id(name)
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))
    return torch.relu(x)
