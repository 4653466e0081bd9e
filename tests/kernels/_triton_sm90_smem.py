"""Shared memory of the portable Triton block-sparse kernels compiled for sm_90, on a machine without a GPU.

    python _triton_sm90_smem.py DTYPE HEAD_DIM BLOCK_Q BLOCK_KV LIMIT
    python _triton_sm90_smem.py small

Runs the launchers (``triton_fwd.block_sparse_fwd``, ``triton_bwd.block_sparse_bwd``) on CPU tensors with
their kernels replaced by recorders, prunes each autotuner's GPU configs for the recorded launch as the
autotuner would (``shared_memory_limit`` reporting LIMIT bytes), compiles every kept config for sm_90
through ``triton.compile`` (with and without TMA loads) and prints, as the last stdout line, JSON: per
kernel and config, the shared memory the compiled kernel asks for. ``small`` compiles the pattern side's small
kernels (the cache's layout density, SpatioTemporal's sampled mass) the same way. Needs TRITON_INTERPRET unset (the test
that calls it runs it in a process of its own for that reason).
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.compiler import ASTSource

from _sm90_specialize import TARGET, specialize
from dit_sparse.kernels.block_sparse import triton_bwd, triton_fwd


class Recorder:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **meta)`` records the launch."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.name, self.kernel, args, meta))


def compile_sm90(fn, args, meta, config):
    """The JIT function ``fn`` compiled for sm_90 with these launch arguments and this config."""
    src = ASTSource(fn, *specialize(fn, args, {**meta, **config.kwargs}))
    return triton.compile(src, target=TARGET,
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def main(dtype: torch.dtype, head_dim: int, block_q: int, block_kv: int, limit: int) -> dict:
    B, H, S = 1, 2, 300
    q, k, v, do = (torch.randn(B, H, S, head_dim).to(dtype) for _ in range(4))
    mq, mk = triton.cdiv(S, block_q), triton.cdiv(S, block_kv)
    counts = torch.full((1, H, mq), mk, dtype=torch.int32)
    idx = torch.arange(mk, dtype=torch.int32).expand(1, H, mq, mk).contiguous()
    q_counts = torch.full((1, H, mk), mq, dtype=torch.int32)
    q_idx = torch.arange(mq, dtype=torch.int32).expand(1, H, mk, mq).contiguous()
    launches = []
    triton_fwd._block_sparse_fwd_kernel = Recorder("fwd", triton_fwd._block_sparse_fwd_kernel, launches)
    triton_bwd._bwd_preprocess = Recorder("preprocess", None, [])
    triton_bwd._bwd_dkdv = Recorder("dkdv", triton_bwd._bwd_dkdv, launches)
    triton_bwd._bwd_dq = Recorder("dq", triton_bwd._bwd_dq, launches)
    for module in (triton_fwd, triton_bwd):
        module.shared_memory_limit = lambda t: limit
    o, lse = triton_fwd.block_sparse_fwd(q, k, v, counts, idx, head_dim ** -0.5, block_q, block_kv, full_rows=False)
    triton_bwd.block_sparse_bwd(do, None, q, k, v, o, lse, counts, idx, q_counts, q_idx, head_dim ** -0.5,
                                block_q, block_kv)
    out = {}
    for name, kernel, args, meta in launches:
        for tma in (False, True):
            meta = dict(meta, TMA_OK=tma)
            for config in kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **meta):
                compiled = compile_sm90(kernel.fn, args, meta, config)
                out[f"{name} {config}"] = compiled.metadata.shared
    return out


def small_kernels() -> dict:
    """The pattern side's kernels that run on every GPU build, compiled for sm_90: the cache's one-launch
    layout density (``layout_density.py``) and SpatioTemporal's sampled block mass (``sampled_mass.py``,
    bf16 and fp32 inputs)."""
    from dit_sparse.block_layout import BlockLayout
    from dit_sparse.kernels.block_score import sampled_mass
    from dit_sparse.kernels.block_sparse import layout_density

    launches = []
    layout_density._kept_pairs_kernel = Recorder("density", layout_density._kept_pairs_kernel, launches)
    sampled_mass._block_stats_kernel = Recorder("sampled_mass", sampled_mass._block_stats_kernel, launches)
    mask = torch.rand(2, 3, 7, 9) < 0.4
    layout_density.mean_density_triton(BlockLayout.from_block_mask_tensor(mask, 100, 130, 16, 16))
    for dtype in (torch.bfloat16, torch.float32):
        q_rows, k = torch.randn(1, 2, 64, 128).to(dtype), torch.randn(1, 2, 300, 128).to(dtype)
        sampled_mass.sampled_block_mass_triton(q_rows, k, 0.088, 128)  # recorded (its numbers unused)
    out = {}
    for name, kernel, args, meta in launches:
        dtype = str(args[0].dtype).removeprefix("torch.") if hasattr(args[0], "dtype") else ""
        compiled = compile_sm90(kernel, args, meta, triton.Config({}, num_warps=4, num_stages=1))
        out[f"{name} {dtype}".strip() if name != "density" else name] = compiled.metadata.shared
    return out


if __name__ == "__main__":
    if sys.argv[1] == "small":
        print(json.dumps(small_kernels()))
    else:
        dt, d, bq, bkv, lim = sys.argv[1:6]
        print(json.dumps(main(getattr(torch, dt), int(d), int(bq), int(bkv), int(lim))))
