"""What the tests of the Hopper Gluon kernels share: inputs, a random layout with the awkward cases, the
sm_90 compile checks (run in a process of their own; also the portable Triton kernels' shared memory),
and the markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_sparse.kernels.block_sparse._hopper_common import HAVE_GLUON

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on H100 / H200
needs_gluon = pytest.mark.skipif(not HAVE_GLUON, reason="this triton has no Gluon")
needs_hopper = pytest.mark.skipif(not (ON_HOPPER and HAVE_GLUON), reason="needs a Hopper GPU")


def qkv(B, H, S, Skv, D=128, dtype=torch.bfloat16, device="cpu", bshd=False, n=3):
    """q, k, v (and more ``[B, H, S, D]`` tensors for ``n`` > 3: do), seeded."""
    g = torch.Generator().manual_seed(0)

    def make(length):
        if bshd:  # a [B, S, H, D] buffer seen as [B, H, S, D], as the attention processors pass it
            return torch.randn(B, length, H, D, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(B, H, length, D, generator=g).to(device, dtype)

    return (make(S), make(Skv), make(Skv), *(make(S) for _ in range(n - 3)))


def random_keep(B, H, mq, mk, density, seed):
    """A boolean block mask with a query block without key blocks (0) and the partial last key block kept
    by query block 1."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, mq, mk, generator=g) < density
    keep[..., 0, :] = False
    keep[..., 1, -1] = True
    return keep


def compile_for_sm90(kernel: str, num_stages: int, skv: int, bshd: bool, dtype: torch.dtype) -> dict:
    """``_hopper_sm90_compile.py``'s report."""
    return _sm90_report("_hopper_sm90_compile.py", kernel, num_stages, skv, int(bshd),
                        str(dtype).removeprefix("torch."))


def triton_sm90_smem(*args) -> dict:
    """``_triton_sm90_smem.py``'s report for ``DTYPE HEAD_DIM BLOCK_Q BLOCK_KV LIMIT`` (shared memory of every
    config the Triton kernels' pruners keep for this launch) or ``small`` (the pattern side's kernels),
    compiled for sm_90."""
    return _sm90_report("_triton_sm90_smem.py", *args)


def _sm90_report(script: str, *args) -> dict:
    """The JSON last line of an sm_90 compile script of this folder, run in a process of its own: under
    TRITON_INTERPRET=1 (set by conftest on CPU) nothing compiles for a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(Path(__file__).with_name(script)), *map(str, args)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
