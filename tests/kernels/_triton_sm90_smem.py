"""Shared memory of the portable Triton block-sparse kernels compiled for sm_90, on a machine without a GPU.

    python _triton_sm90_smem.py DTYPE HEAD_DIM BLOCK_Q BLOCK_KV LIMIT
    python _triton_sm90_smem.py small
    python _triton_sm90_smem.py sla DTYPE HEAD_DIM BLOCK LIMIT

Runs the launchers (``triton_fwd.block_sparse_fwd``, ``triton_bwd.block_sparse_bwd``) on CPU tensors with
their kernels replaced by recorders, prunes each autotuner's GPU configs for the recorded launch as the
autotuner would (``shared_memory_limit`` reporting LIMIT bytes), compiles every kept config for sm_90
through ``triton.compile`` (with and without TMA loads) and prints, as the last stdout line, JSON: per
kernel and config, the shared memory the compiled kernel asks for. ``small`` compiles the pattern side's small
kernels (the cache's layout density, SpatioTemporal's sampled mass) the same way; ``sla`` every kernel of
sparse-linear attention's forward and backward (``BLOCK`` x ``BLOCK`` layout blocks, all rows partly
linear). Needs TRITON_INTERPRET unset (the test
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


def record_block_sparse(launches: list, limit: int) -> None:
    """The block-sparse forward and backward kernels replaced by recorders into ``launches`` (the backward
    preprocess by one that records nothing), with ``limit`` bytes of shared memory for their pruners."""
    triton_fwd._block_sparse_fwd_kernel = Recorder("fwd", triton_fwd._block_sparse_fwd_kernel, launches)
    triton_bwd._bwd_preprocess = Recorder("preprocess", None, [])
    triton_bwd._bwd_dkdv = Recorder("dkdv", triton_bwd._bwd_dkdv, launches)
    triton_bwd._bwd_dq = Recorder("dq", triton_bwd._bwd_dq, launches)
    for module in (triton_fwd, triton_bwd):
        module.shared_memory_limit = lambda t: limit


def compile_launches(launches: list) -> dict:
    """Shared memory of every recorded launch compiled for sm_90: an autotuned kernel's kept configs, with
    and without TMA loads where it has that switch; a plain JIT kernel with its launch's num_warps."""
    out = {}
    for name, kernel, args, meta in launches:
        if not hasattr(kernel, "configs"):
            meta = dict(meta)
            config = triton.Config({}, num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))
            out[name] = compile_sm90(kernel, args, meta, config).metadata.shared
            continue
        for tma in ((False, True) if "TMA_OK" in kernel.fn.arg_names else (None,)):
            meta_t = meta if tma is None else dict(meta, TMA_OK=tma)
            configs = kernel.configs
            if getattr(kernel, "early_config_prune", None):
                configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **meta_t)
            for config in configs:
                out[f"{name} {config}"] = compile_sm90(kernel.fn, args, meta_t, config).metadata.shared
    return out


def main(dtype: torch.dtype, head_dim: int, block_q: int, block_kv: int, limit: int) -> dict:
    B, H, S = 1, 2, 300
    q, k, v, do = (torch.randn(B, H, S, head_dim).to(dtype) for _ in range(4))
    mq, mk = triton.cdiv(S, block_q), triton.cdiv(S, block_kv)
    counts = torch.full((1, H, mq), mk, dtype=torch.int32)
    idx = torch.arange(mk, dtype=torch.int32).expand(1, H, mq, mk).contiguous()
    q_counts = torch.full((1, H, mk), mq, dtype=torch.int32)
    q_idx = torch.arange(mq, dtype=torch.int32).expand(1, H, mk, mq).contiguous()
    launches = []
    record_block_sparse(launches, limit)
    o, lse = triton_fwd.block_sparse_fwd(q, k, v, counts, idx, head_dim ** -0.5, block_q, block_kv, full_rows=False)
    triton_bwd.block_sparse_bwd(do, None, q, k, v, o, lse, counts, idx, q_counts, q_idx, head_dim ** -0.5,
                                block_q, block_kv)
    return compile_launches(launches)


def sla_kernels(dtype: torch.dtype, head_dim: int, block: int, limit: int) -> dict:
    """Every kernel of sparse-linear attention's Triton forward and backward: the LINEAR block-sparse
    forward, the linear output, the block / complement states, the block-sparse backward and the linear
    dq and dk / dv kernels."""
    from dit_sparse.kernels.sparse_linear import triton_bwd as sla_bwd
    from dit_sparse.kernels.sparse_linear import triton_fwd as sla_fwd
    from dit_sparse.kernels.sparse_linear import triton_state

    B, H, S = 1, 2, 300
    q, k, v, do_s, do_l = (torch.randn(B, H, S, head_dim).to(dtype) for _ in range(5))
    m = triton.cdiv(S, block)
    counts = torch.ones(1, H, m, dtype=torch.int32)  # one critical block per row: both branches run
    idx = torch.arange(m, dtype=torch.int32).view(1, 1, m, 1).expand(1, H, m, m).contiguous()
    launches = []
    record_block_sparse(launches, limit)
    for module, name in ((sla_fwd, "_linear_output_kernel"), (sla_bwd, "_sla_lin_dq_kernel"),
                         (sla_bwd, "_sla_lin_dkdv_kernel"), (triton_state, "_block_state_kernel"),
                         (triton_state, "_complement_kernel")):
        setattr(module, name, Recorder(name, getattr(module, name), launches))
    o_s, _, lse = sla_fwd.sla_forward(q, k, v, counts, idx, block, block, 0, head_dim ** -0.5, 1e-6)
    sla_fwd.linear_output(q, sla_fwd.LinearBranch(*sla_fwd.linear_states(k, v, counts.expand(B, H, m),
                                                                         idx.expand(B, H, m, m), block, 0),
                                                  torch.empty_like(q), 0, 1e-6), block)
    sla_bwd.sla_backward(do_s, do_l, q, k, v, o_s, lse, counts, idx, block, block, 0, head_dim ** -0.5, 1e-6)
    return compile_launches(launches)


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
    elif sys.argv[1] == "sla":
        dt, d, block, lim = sys.argv[2:6]
        print(json.dumps(sla_kernels(getattr(torch, dt), int(d), int(block), int(lim))))
    else:
        dt, d, bq, bkv, lim = sys.argv[1:6]
        print(json.dumps(main(getattr(torch, dt), int(d), int(bq), int(bkv), int(lim))))
