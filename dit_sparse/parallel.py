"""dit-sparse under diffusers' context parallelism (Ulysses): one generation spread over several GPUs.

diffusers splits a transformer's tokens along the sequence across ranks
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``). Before each
attention, its templated Ulysses attention (``diffusers.models.attention_dispatch``) exchanges q, k, v
all-to-all so that every rank holds ALL tokens for ``H / N`` of the heads, runs a per-rank attention
op on ``[B, S, H / N, D]`` and exchanges the output back to ``[B, S / N, H, D]``. dit-sparse plugs its
engine in as that per-rank op (:func:`ulysses_attend`): each rank permutes the full sequence into tile
order, builds / caches the block layout of its own head shard and runs the sparse kernel. The token
layout is the full grid (the family hook reads it from the unsplit latent) and cache keys carry the
head shard, so layouts of different shards never mix (also not in a saved cache).

Supported: the families whose self-attention covers the video tokens only, contiguous in model order
(:data:`ULYSSES_FAMILIES`: Wan, LTX-Video), Ulysses with any degree that divides the head count
(``ulysses_anything`` included), ``mode="sparse"``. Everything else raises ``ValueError`` instead of
computing something wrong: ring attention (``ring_degree > 1``), joint text+video attention families
(their text and video shards interleave after the all-to-all), ``mode="sla"``, and block reuse that
would skip the block carrying diffusers' sequence split.

Launching: :func:`launch` starts N processes with ``torch.multiprocessing`` (NCCL on CUDA, gloo on
CPU) and :func:`init_process_group` joins a ``torchrun`` launch; :func:`enable_ulysses` calls diffusers'
``enable_parallelism`` (and works around its CPU-only device lookup in diffusers 0.42, which divides by
the accelerator count).

Example (one process per GPU, e.g. ``torchrun --nproc-per-node 2 script.py``)::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention
    from dit_sparse.parallel import enable_ulysses, init_process_group

    rank, world = init_process_group()
    pipe = load_pipeline(...).to(f"cuda:{rank}")
    enable_ulysses(pipe.transformer, world)
    apply_sparse_attention(pipe, SparseAttentionConfig.preset("fast"))
    video = pipe(prompt, ...).frames[0]          # the same video on every rank; rank 0 writes it
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass, replace
from typing import Callable

import torch

__all__ = [
    "HeadShard",
    "ULYSSES_FAMILIES",
    "NCCL_ENV",
    "context_parallel_config",
    "check_supported",
    "check_application",
    "propagate_parallel_config",
    "full_sequence_length",
    "ulysses_attend",
    "enable_ulysses",
    "init_process_group",
    "launch",
]

# Families whose sparse self-attention is exact under Ulysses (video-only self-attention, contiguous shards).
ULYSSES_FAMILIES = ("wan", "ltx")

# NVLink multicast (NVLS) stays off in every launched process.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_RING_ERROR = (
    "ring context parallelism (ring_degree={ring}) is not supported by dit-sparse's sparse processors; "
    "use ContextParallelConfig(ulysses_degree=N) with ring_degree=1"
)


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank attends over under Ulysses: shard ``index`` of ``count`` equal head shards."""

    index: int
    count: int

    def heads(self, total: int) -> range:
        """Global indices of this shard's heads out of ``total`` heads."""
        per = total // self.count
        return range(self.index * per, (self.index + 1) * per)


def context_parallel_config(processor_or_model):
    """The active ``ContextParallelConfig`` of a processor or transformer (``_parallel_config``), or ``None``.

    Raises ``ValueError`` for ring attention (``ring_degree > 1``), which the sparse path cannot compute.
    """
    parallel = getattr(processor_or_model, "_parallel_config", None)
    cp = getattr(parallel, "context_parallel_config", None)
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        raise ValueError(_RING_ERROR.format(ring=cp.ring_degree))
    return cp if (cp.ulysses_degree or 1) > 1 else None


def check_supported(family_name: str, config) -> None:
    """Raise ``ValueError`` unless the sparse processors of ``family_name`` with ``config`` (a
    :class:`~dit_sparse.config.SparseAttentionConfig`) are exact under Ulysses context parallelism."""
    if family_name not in ULYSSES_FAMILIES:
        raise ValueError(
            f"context parallelism is not supported by dit-sparse for the '{family_name}' family (its joint "
            f"text+video attention interleaves the rank shards); supported: {', '.join(ULYSSES_FAMILIES)}. "
            f"Run this model on one GPU or without dit-sparse"
        )
    if config.mode == "sla":
        raise ValueError("mode='sla' is not supported under context parallelism; use mode='sparse'")
    if config.reuse_scope == "block" and 0 not in config.always_compute_blocks:
        raise ValueError(
            "under context parallelism block 0 carries diffusers' sequence split and must compute on every "
            "step; add 0 to always_compute_blocks"
        )


def check_application(transformer, family_name: str, config) -> None:
    """:func:`check_supported` when ``transformer`` already runs under context parallelism (ring raises
    too); nothing otherwise. ``apply_sparse_attention`` calls it before changing anything; processors
    check again at their first call (for ``enable_parallelism`` after applying)."""
    if context_parallel_config(transformer) is not None:
        check_supported(family_name, config)


def propagate_parallel_config(transformer, extra=()) -> None:
    """Give every attention processor of ``transformer`` (and the processors in ``extra``) the
    transformer's parallel config, as ``enable_parallelism`` does: processors set after it (ours, or
    stock ones restored on removal) would otherwise attend over their local sequence shard only."""
    parallel = getattr(transformer, "_parallel_config", None)
    if getattr(parallel, "context_parallel_config", None) is None:
        return
    procs = [getattr(m, "processor", None) for m in transformer.modules()] + list(extra)
    for proc in procs:
        if proc is not None and hasattr(proc, "_parallel_config"):
            proc._parallel_config = parallel


def _shard_sizes(total: int, count: int, uneven: bool) -> list[int] | None:
    if uneven:  # torch.tensor_split: the first (total % count) shards are one longer
        base, extra = divmod(total, count)
        return [base + (i < extra) for i in range(count)]
    return [total // count] * count if total % count == 0 else None


def full_sequence_length(local_len: int, grid_len: int, cp) -> int | None:
    """The full sequence length when ``local_len`` is this rank's shard of ``grid_len`` tokens, else ``None``.

    ``cp``: the ``ContextParallelConfig``. ``None`` means the tokens are not the video grid sharded as
    diffusers shards it (e.g. a shape the kernel path does not handle); the caller computes stock.
    """
    rank = torch.distributed.get_rank(cp._flattened_mesh.get_group())
    sizes = _shard_sizes(grid_len, cp._flattened_mesh.size(), bool(cp.ulysses_anything))
    if sizes is None or sizes[rank] != local_len:
        return None
    return grid_len


def head_shard(cp) -> HeadShard:
    """This rank's :class:`HeadShard` in the Ulysses group of ``cp``."""
    return HeadShard(int(cp._ulysses_local_rank), int(cp.ulysses_degree))


def ulysses_attend(engine, plan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, parallel_config,
                   *, scale: float | None = None) -> torch.Tensor:
    """Sparse attention of this rank's sequence shard through diffusers' templated Ulysses attention.

    Args:
        engine: the :class:`~dit_sparse.engine.SparseAttentionEngine`.
        plan: the engine's plan for this call, made for the FULL sequence length.
        query, key, value: ``[B, S_local, H, D]`` (diffusers' layout), this rank's tokens, all heads.
        parallel_config: the processor's ``ParallelConfig`` (Ulysses, ``ring_degree == 1``).

    Returns ``[B, S_local, H, D]``. Inside, each rank runs ``engine.attend`` on ``[B, H / N, S, D]``
    (all tokens, its head shard). Gradients flow (the per-rank backward differentiates the engine call).
    """
    cp = parallel_config.context_parallel_config
    if (cp.ring_degree or 1) > 1:
        raise ValueError(_RING_ERROR.format(ring=cp.ring_degree))
    if query.shape[2] % cp.ulysses_degree:
        raise ValueError(
            f"{query.shape[2]} heads cannot be split over ulysses_degree={cp.ulysses_degree}; use a degree that "
            f"divides the head count"
        )
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    plan = replace(plan, head_shard=head_shard(cp))
    return _templated_context_parallel_attention(
        query, key, value, None, 0.0, False, scale, False, False,
        forward_op=_engine_forward_op(engine, plan), backward_op=_engine_backward_op,
        _parallel_config=parallel_config,
    )


def _engine_forward_op(engine, plan) -> Callable:
    """The per-rank op diffusers' Ulysses attention calls on ``[B, S, H_local, D]``."""

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("dit-sparse's Ulysses op does not return the log-sum-exp")
        needs_grad = _save_ctx and any(getattr(ctx, "needs_input_grad", (False,))[:3])
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        if not needs_grad:
            return engine.attend(plan, q, k, v, scale=scale).transpose(1, 2)
        with torch.enable_grad():  # keep the per-rank graph for backward_op (no recomputation)
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = engine.attend(plan, *leaves, scale=scale).transpose(1, 2)
        ctx.dit_sparse_graph = (leaves, out)
        return out.detach()

    return forward_op


def _engine_backward_op(ctx, grad_out):
    graph = getattr(ctx, "dit_sparse_graph", None)
    if graph is None:
        raise ValueError("backward through dit-sparse's Ulysses op needs q, k or v to require grad in forward")
    leaves, out = graph
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    ctx.dit_sparse_graph = None
    return tuple(g.transpose(1, 2) for g in grads)


# ---------------------------------------------------------------------------------------------- launching
@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42 picks the rank's device as ``rank % torch.accelerator.device_count()``, which is a
    division by zero without an accelerator; on CPU-only hosts count the CPU as one device meanwhile."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_ulysses(transformer, degree: int | None = None, *, cp_plan=None):
    """``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))``.

    ``degree`` defaults to the world size of the initialised process group. Raises ``ValueError`` when
    ``torch.distributed`` is not initialised or ``degree`` does not divide the attention head count.
    Works on CPU (gloo) too. Returns the transformer.
    """
    from diffusers import ContextParallelConfig

    if not torch.distributed.is_initialized():
        raise ValueError("torch.distributed is not initialised; call init_process_group() or launch() first")
    degree = torch.distributed.get_world_size() if degree is None else degree
    if not isinstance(degree, int) or degree < 2:
        raise ValueError(f"ulysses degree must be an int >= 2, got {degree!r}")
    heads = getattr(transformer.config, "num_attention_heads", None)
    if heads is not None and heads % degree:
        raise ValueError(f"the transformer has {heads} heads, not divisible by {degree} GPUs; use a divisor of {heads}")
    with _cpu_device_count():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=cp_plan)
    return transformer


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group described by the environment (``torchrun`` / :func:`launch`); returns
    ``(rank, world_size)``. Backend: NCCL when CUDA is available, else gloo. Each CUDA rank uses GPU
    ``LOCAL_RANK``. NVLink multicast stays off (:data:`NCCL_ENV`)."""
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"environment variables {', '.join(missing)} are not set; start with torchrun or launch()")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **NCCL_ENV})
    init_process_group()
    try:
        fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()


def launch(fn: Callable, nprocs: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes joined in one process group
    (NCCL on CUDA with GPU ``rank`` each, gloo on CPU). ``fn`` and ``args`` must be picklable (a
    module-level function). Raises when a process fails (``torch.multiprocessing.ProcessRaisedException``)."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    if torch.cuda.is_available() and nprocs > torch.cuda.device_count():
        raise ValueError(f"{nprocs} processes asked but only {torch.cuda.device_count()} GPUs are visible")
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, _free_port(), fn, args), nprocs=nprocs, join=True)
