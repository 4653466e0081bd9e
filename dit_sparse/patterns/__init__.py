"""Sparse attention patterns (``dit_sparse.patterns``): each builds a
:class:`~dit_sparse.block_layout.BlockLayout` for a :class:`PatternContext`, and ``p1 | p2`` unites them.

* :class:`Dense` - every block
* :class:`Tile3D` - sliding 3D tile windows (STA), per-head window sizes
* :class:`SpatioTemporal` - spatial or temporal heads, chosen from sampled queries (Sparse VideoGen)
* :class:`TopK` - dynamic, from mean-pooled Q/K block scores (top ratio or cumulative mass)
* :class:`TextAlwaysOn` - dense text rows and columns for MM-DiT
* :class:`FirstFrameSink` - every query keeps the first frame(s)
* :func:`layout_density`, :func:`attention_recall` - what presets are tuned on

Example::

    ctx = PatternContext(TokenLayout(21, 30, 52, tile=(4, 4, 8)), batch=1, heads=12)
    layout = (Tile3D((3, 3, 3)) | TextAlwaysOn()).build(ctx)
"""

from .base import Pattern, PatternContext, UnionPattern
from .dense import Dense
from .metrics import attention_recall, layout_density
from .sink import FirstFrameSink
from .spatiotemporal import HeadClassification, SpatioTemporal
from .text import TextAlwaysOn
from .tile3d import Tile3D
from .topk import TopK

__all__ = [
    "Pattern",
    "PatternContext",
    "UnionPattern",
    "Dense",
    "Tile3D",
    "SpatioTemporal",
    "HeadClassification",
    "TopK",
    "TextAlwaysOn",
    "FirstFrameSink",
    "layout_density",
    "attention_recall",
]
