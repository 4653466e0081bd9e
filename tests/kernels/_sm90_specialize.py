"""What the sm_90 compile scripts (``_hopper_sm90_compile.py``, ``_triton_sm90_smem.py``) share: the target,
and a kernel's launch arguments specialised as the JIT would, for ``triton.compile`` without a GPU."""

from __future__ import annotations

from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend

TARGET = GPUTarget("cuda", 90, 32)


def specialize(fn, args, constexprs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constants, attrs)`` of JIT function ``fn`` for positional ``args`` (every non-constexpr
    parameter, in order) and its constexpr parameters' values taken from ``constexprs``."""
    backend = CUDABackend(TARGET)
    const_names = [p.name for p in fn.params if p.is_constexpr]
    positional = [n for n in fn.arg_names if n not in const_names]
    assert len(positional) == len(args), (positional, len(args))
    signature, attrs, constants = {}, {}, {}
    for name, arg in zip(positional, args):
        ty, key = native_specialize_impl(CUDABackend, arg, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # the JIT folds integer arguments equal to 1 into the kernel
            constants[name] = arg
        if isinstance(key, str):
            attrs[(fn.arg_names.index(name),)] = backend.parse_attr(key)
    for name in const_names:
        signature[name] = "constexpr"
        constants[name] = constexprs[name]
    return signature, constants, attrs
