"""One forward + backward of the block-sparse kernels and of cuDNN's dense attention, for a profiler (GPU only).

At one shape and density (a random 128x128 block layout, as ``bench_kernels.py`` draws it) it runs
``block_sparse_attention(q, k, v, layout).backward(do)`` - on Hopper the Gluon forward, dQ and dK/dV
kernels - and, unless ``--no-cudnn``, SDPA pinned to cuDNN forward + backward on the same bf16 inputs.
Everything runs twice: the first pass compiles, the second is identical. Under Nsight Compute, e.g.::

    ncu --clock-control none -k regex:"hopper|sdpa|flash|fmha" \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section MemoryWorkloadAnalysis \\
        --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \\
        -o profile python scripts/profile_kernels.py --shape wan --density 0.1
    ncu --import profile.ncu-rep --page details

(``--clock-control none`` leaves the GPU's clocks as they are; the kernel-name filter keeps the torch
set-up kernels out.) The profile in ``benchmarks/NOTES-kernels.md`` (round 9) was taken this way.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

from bench_kernels import SHAPES, _import_kernels, random_layout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="wan", help="attention shape (default wan)")
    p.add_argument("--density", type=float, default=0.1, help="share of key blocks kept, in (0, 1] (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the layout")
    p.add_argument("--no-cudnn", action="store_true", help="only the block-sparse kernels")
    args = p.parse_args(argv)
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA GPU (it runs the kernels for a profiler to measure)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block_sparse_attention = _import_kernels()[0]

    B, H, S, D = SHAPES[args.shape]
    torch.manual_seed(args.seed)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    layout = random_layout(B, H, S, args.density, args.seed, "cuda")
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def one_pass():
        block_sparse_attention(qg, kg, vg, layout).backward(do)
        if not args.no_cudnn:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qg, kg, vg).backward(do)

    for _ in range(2):
        one_pass()
        torch.cuda.synchronize()
    kept = layout.kv_counts.float().mean().item() / layout.kv_indices.shape[-1]
    print(f"{args.shape}: B{B} H{H} S{S} D{D}, {kept:.4f} of the key blocks kept; two passes run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
