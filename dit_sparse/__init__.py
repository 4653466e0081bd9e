"""dit-sparse: sparse attention for diffusion transformers through fused Triton kernels.

Public API (see README.md):

* :class:`BlockLayout` - per query block, the key blocks kept (the kernels' input)
* :class:`TokenLayout` - the video token grid and its permutation into 3D-tile order
"""

from .block_layout import BlockLayout

__all__ = ["BlockLayout", "TokenLayout"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy imports keep `import dit_sparse` cheap (no Triton, no diffusers until needed).
    if name == "TokenLayout":
        from .layout import TokenLayout

        return TokenLayout
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")
