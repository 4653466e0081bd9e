"""Sparse-linear attention (SLA): exact softmax attention on critical key blocks, linear attention on the rest.

* :func:`sparse_linear_attention` - the public op (checks, backend choice) -> ``(o_sparse, o_linear)``
* ``op.py`` - the Triton kernels as ``torch.library`` custom ops with autograd (``dit_sparse::sla_forward``)
* ``triton_state.py`` / ``triton_fwd.py`` / ``triton_bwd.py`` - the kernels and their launchers
* ``naive.py`` - the dense reference and the memory-light PyTorch backend
* ``feature_maps.py`` - the feature maps phi of the linear part
"""

from .api import TRITON_BLOCK_SIZES, TRITON_HEAD_DIMS, sparse_linear_attention
from .feature_maps import FEATURE_MAPS, LINEAR_EPS, apply_feature_map
from .naive import sparse_linear_attention_ref, sparse_linear_attention_torch

__all__ = [
    "sparse_linear_attention",
    "sparse_linear_attention_ref",
    "sparse_linear_attention_torch",
    "apply_feature_map",
    "FEATURE_MAPS",
    "LINEAR_EPS",
    "TRITON_HEAD_DIMS",
    "TRITON_BLOCK_SIZES",
]
