"""The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` since diffusers 0.42, ``torch_dtype`` before."""

from __future__ import annotations


def dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, whichever the installed diffusers takes without a warning."""
    import diffusers
    from packaging.version import Version

    newer = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype": dtype} if newer else {"torch_dtype": dtype}
