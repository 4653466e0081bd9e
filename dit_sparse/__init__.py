"""dit-sparse: sparse attention for diffusion transformers through fused Triton kernels.

Public API (see README.md)::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention, remove_sparse_attention
    apply_sparse_attention(pipe, SparseAttentionConfig.preset("fast"))
    video = pipe(prompt, num_frames=81, height=480, width=832).frames[0]
    print(pipe.transformer.sparse_attention_stats())
    remove_sparse_attention(pipe)

Building blocks: :class:`BlockLayout` (per query block, the key blocks kept: the kernels' input),
:class:`TokenLayout` (video token grid and its 3D-tile permutation), the patterns in
:mod:`dit_sparse.patterns`, :class:`PatternCache`, :class:`StepSchedule`, and the kernels in
:mod:`dit_sparse.kernels`.

Names are imported lazily, so ``import dit_sparse`` loads neither Triton nor diffusers.
"""

from __future__ import annotations

import importlib

from .block_layout import BlockLayout

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "TokenLayout": ".layout",
    "PatternCache": ".cache",
    "CacheKey": ".cache",
    "StepSchedule": ".schedule",
    "StepState": ".schedule",
    "Decision": ".schedule",
    "StepCache": ".step_cache",
    "SparseAttentionConfig": ".config",
    "apply_sparse_attention": ".apply",
    "remove_sparse_attention": ".apply",
    "sla_modules": ".apply",
    "SparseAttnProcessor": ".processors",
    "SparseLinearAttention": ".sla",
    "save_sla_weights": ".sla",
    "load_sla_weights": ".sla",
}

__all__ = ["BlockLayout", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
