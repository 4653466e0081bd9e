"""Attention processors of dit-sparse, one module per model family, plus the one-instance
:class:`SparseAttnProcessor`.

Each family processor subclasses the model's own diffusers processor and replaces only the self /
joint attention core (projections, norms and rotary stay the model's):

* ``wan``: :class:`WanSparseAttnProcessor` (``WanTransformer3DModel``, Wan 2.1 / 2.2 incl. 5B)
* ``cogvideox``: :class:`CogVideoXSparseAttnProcessor` (text-first joint attention)
* ``hunyuan_video``: :class:`HunyuanVideoSparseAttnProcessor` (video then text, padded-text key mask)
* ``ltx``: :class:`LTXSparseAttnProcessor`
* ``mochi``: :class:`MochiSparseAttnProcessor` (modules without ``set_processor``)
* ``flux``: :class:`FluxSparseAttnProcessor` (text-first MM-DiT, dual- and single-stream blocks)
"""

from .cogvideox import CogVideoXSparseAttnProcessor
from .flux import FluxSparseAttnProcessor
from .generic import SparseAttnProcessor
from .hunyuan_video import HunyuanVideoSparseAttnProcessor
from .ltx import LTXSparseAttnProcessor
from .mochi import MochiSparseAttnProcessor
from .registry import families, family_of, supported_transformer_classes
from .wan import WanSparseAttnProcessor

__all__ = [
    "SparseAttnProcessor",
    "WanSparseAttnProcessor",
    "CogVideoXSparseAttnProcessor",
    "HunyuanVideoSparseAttnProcessor",
    "LTXSparseAttnProcessor",
    "MochiSparseAttnProcessor",
    "FluxSparseAttnProcessor",
    "families",
    "family_of",
    "supported_transformer_classes",
]
