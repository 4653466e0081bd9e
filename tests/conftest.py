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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tiny tensors: extra threads only add contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
