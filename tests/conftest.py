"""Test set-up: without a GPU, Triton kernels run in the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, so it is set here, before
the test modules import dit_sparse.kernels.
"""

import os

# The interpreter runs tl.dot as a numpy matmul; multi-threaded OpenBLAS on a small, busy machine made
# it about 300x slower. Must be set before numpy/torch load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_xor_sum_in_numpy():
    """Triton's interpreter reduces with any combine function but sum/min/max one element at a time in
    Python. ``tl.sort`` / ``tl.topk`` find each compare-and-swap partner with an xor reduction along one
    axis, at every one of their ~log2(n)^2 / 2 stages, which made the top-k select kernel ~100x slower
    under the interpreter. Reduce xor along an axis with numpy instead: the same values, dtype and shape
    as the interpreter's fold (xor is associative and commutative; numpy keeps integer and bool dtypes).

    Anything else is left to the interpreter's own reduction: other combine functions, several inputs,
    ``axis=None`` (whose keep_dims shape the interpreter builds its own way), non-integer data, or any
    error in the fast path. If Triton's internals differ (no ``ReduceOps.apply_impl`` / ``to_tensor``, no
    ``_xor_combine``), nothing is patched: the tests are only slower."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        ops = interpreter.ReduceOps
        xor = tl.standard._xor_combine
        generic = ops.apply_impl
        if not callable(generic) or not callable(ops.to_tensor):
            return
    except Exception:  # not importable, or other internals: leave the interpreter as it is
        return
    if getattr(generic, "_numpy_xor", False):  # already patched (conftest imported twice)
        return

    def numpy_xor(self, input):
        # The reduction, or None where the interpreter's own must run.
        if getattr(self, "combine_fn", None) is not xor or not isinstance(input, tuple) or len(input) != 1:
            return None
        axis, data = self.axis, input[0].handle.data
        if type(axis) is not int or not isinstance(data, np.ndarray) or data.dtype.kind not in "biu":
            return None
        if not 0 <= axis < data.ndim:
            return None
        return self.to_tensor(np.bitwise_xor.reduce(data, axis=axis, keepdims=bool(self.keep_dims)),
                              input[0].dtype)

    def apply_impl(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            try:
                out = numpy_xor(self, args[0])
            except Exception:
                out = None
            if out is not None:
                return out
        return generic(self, *args, **kwargs)

    apply_impl._numpy_xor = True
    ops.apply_impl = apply_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_xor_sum_in_numpy()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny tensors: extra threads only add contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
