"""Block-sparse attention (fused Triton forward + backward), as ``dit_sparse.kernels.block_sparse``.

Naming chain, from the outside in: :func:`block_sparse_attention` (validation, backend dispatch; ``api.py``)
-> ``dit_sparse::block_sparse_fwd`` / ``_bwd`` custom ops (autograd, fake kernels; ``function.py``)
-> launchers ``block_sparse_fwd`` / ``block_sparse_bwd`` (``triton_fwd.py`` / ``triton_bwd.py``; on Hopper,
for bf16 / fp16, D = 128 and 128-blocks, the forward is ``hopper_block_sparse_fwd`` in ``hopper_fwd.py``, a
warp-specialised Gluon kernel) -> ``@triton.jit`` / ``@gluon.jit`` kernels. ``naive.py`` holds the dense
reference and the PyTorch gather implementation.
"""

from .api import block_sparse_attention
from .naive import block_sparse_attention_reference, block_sparse_attention_torch

__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "block_sparse_attention_torch"]
