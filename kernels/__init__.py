"""Fused Triton kernels of dit-sparse, installed as ``dit_sparse.kernels``.

One folder per op (``block_sparse/``, ``sparse_linear/``, ``block_score/``): Triton kernels and
launchers, the autograd Function / custom op, the public function with validation, and ``naive.py``
with the plain PyTorch reference that the tests compare against.
"""

__all__ = ["block_sparse_attention", "sparse_linear_attention", "block_scores"]


def __getattr__(name):
    if name == "block_sparse_attention":
        from .block_sparse import block_sparse_attention

        return block_sparse_attention
    if name == "sparse_linear_attention":
        from .sparse_linear import sparse_linear_attention

        return sparse_linear_attention
    if name == "block_scores":
        from .block_score import block_scores

        return block_scores
    raise AttributeError(f"module 'dit_sparse.kernels' has no attribute {name!r}")
