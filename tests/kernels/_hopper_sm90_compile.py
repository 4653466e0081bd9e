"""Compile a Hopper Gluon kernel for sm_90 on a machine without a GPU and print what ptxas made of it.

    python _hopper_sm90_compile.py KERNEL NUM_STAGES KV_LEN BSHD(0|1) DTYPE(bfloat16|float16)

KERNEL: fwd, fwd-pingpong, dkdv, dq (delta computed in the kernel, as launched) or dq-given-delta.

Builds the launcher's own arguments (``kernel_launch`` of ``hopper_fwd`` / ``hopper_dkdv`` / ``hopper_dq``) on CPU
tensors - B=2, H=3, Sq=300, a batch-broadcast layout, q / k / v / do in ``[B, H, S, D]`` or as a
``[B, S, H, D]`` buffer's view - specialises them as the JIT would, compiles through ``triton.compile`` and
runs ``ptxas -v``. The last stdout line is
JSON: shared memory bytes, wgmma instruction count, setmaxnreg use, spill bytes. Needs TRITON_INTERPRET
unset (the test that calls it runs it in a process of its own for that reason).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource

from _sm90_specialize import TARGET, specialize
from dit_sparse.kernels.block_sparse import hopper_dkdv, hopper_dq, hopper_fwd


def launch_of(kernel, q, k, v, counts, idx, num_stages):
    """The Gluon kernel and the ``(grid, args, kwargs)`` its launcher builds for these CPU tensors."""
    B, H, S, _ = q.shape
    lse = torch.empty(B, H, S)
    if kernel in ("fwd", "fwd-pingpong"):
        launch = hopper_fwd.kernel_launch(q, k, v, torch.empty_like(q), lse, counts, idx, 0.088, num_stages,
                                          pingpong=kernel == "fwd-pingpong")
        return hopper_fwd._hopper_fwd_kernel, launch
    delta = torch.empty(B, H, S)
    if kernel in ("dq", "dq-given-delta"):  # the launcher's (delta computed in the kernel), the one reading it
        fused = dict(o=torch.empty_like(q), dlse=torch.empty(B, H, S)) if kernel == "dq" else {}
        launch = hopper_dq.kernel_launch(q, k, v, torch.empty_like(q), lse, delta, torch.empty_like(q), counts, idx,
                                         0.088, num_stages, **fused)
        return hopper_dq._hopper_dq_kernel, launch
    launch = hopper_dkdv.kernel_launch(q, k, v, torch.empty_like(q), lse, delta, torch.empty_like(k),
                                       torch.empty_like(v), counts, idx, 0.088, num_stages)
    return hopper_dkdv._hopper_dkdv_kernel, launch


def compile_sm90(fn, launch, num_stages):
    """``fn`` compiled for sm_90 with the launcher's arguments, specialised as the JIT would."""
    _, args, kwargs = launch
    options = {name: kwargs.pop(name) for name in ("num_warps", "maxnreg")}
    src = GluonASTSource(fn, *specialize(fn, args, kwargs))
    return triton.compile(src, target=TARGET, options=dict(num_stages=num_stages, **options))


def ptxas_spill_bytes(ptx: str) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                             capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr + run.stdout)
    if not spills:
        raise RuntimeError(f"no spill report from ptxas: {run.stderr}")
    return sum(int(a) + int(b) for a, b in spills)


def main(kernel: str, num_stages: int, kv_len: int, bshd: bool, dtype: torch.dtype) -> dict:
    B, H, S, D = 2, 3, 300, 128

    def make(n):
        if bshd:
            return torch.empty(B, n, H, D, dtype=dtype).transpose(1, 2)
        return torch.empty(B, H, n, D, dtype=dtype)

    q, k, v = make(S), make(kv_len), make(kv_len)
    mq, mk = triton.cdiv(S, 128), triton.cdiv(kv_len, 128)
    rows, cols = (mk, mq) if kernel == "dkdv" else (mq, mk)  # dK/dV walks the transposed layout
    counts = torch.zeros(1, H, rows, dtype=torch.int32)
    idx = torch.zeros(1, H, rows, cols, dtype=torch.int32)
    fn, launch = launch_of(kernel, q, k, v, counts, idx, num_stages)
    compiled = compile_sm90(fn, launch, num_stages)
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
                spill_bytes=ptxas_spill_bytes(ptx))


if __name__ == "__main__":
    kernel, stages, kv, layout, dt = sys.argv[1:6]
    print(json.dumps(main(kernel, int(stages), int(kv), layout == "1", getattr(torch, dt))))
