"""dit-sparse under diffusers' context parallelism (Ulysses): one generation spread over several GPUs.

diffusers splits a transformer's tokens along the sequence across ranks
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N), cp_plan=...)``; the
``cp_plan`` says where to split and where to gather). Before each attention, its templated Ulysses
attention (``diffusers.models.attention_dispatch``) exchanges q, k, v all-to-all so that every rank holds
ALL tokens for ``H / N`` of the heads, runs a per-rank attention op on ``[B, S, H / N, D]`` and exchanges
the output back to ``[B, S / N, H, D]``. dit-sparse plugs its engine in as that per-rank op
(:func:`ulysses_attend`): each rank permutes the full sequence into tile order, builds / caches the
block layout of its own head shard and runs the sparse kernel. The token layout is the full grid (the
family hook reads it from the unsplit latent) and cache keys carry the head shard, so layouts of
different shards never mix (also not in a saved cache).

Joint text+video attention (HunyuanVideo): every rank holds ``[video_r, text_r]``, its shard of the video
tokens followed by its shard of the text tokens, so after the all-to-all the full sequence arrives
interleaved (``[video_0, text_0, video_1, text_1, ...]``). The per-rank op puts it back into canonical
order (all video tokens in model order, then the text) before the tile permutation, and the output back
into the gathered order; the text padding mask travels with the tokens (each rank's local key mask is
all-gathered by diffusers alongside the keys) and is applied exactly as on one GPU (dense text keys
merged with the sparse video keys by log-sum-exp). diffusers 0.42 has no ``_cp_plan`` for
``HunyuanVideoTransformer3DModel``; :data:`HUNYUAN_VIDEO_CP_PLAN` is dit-sparse's: split the video tokens
after the patch embedding (``x_embedder``) and the rotary tables (``rope``), the refined text tokens at
the first block's input, gather the video at ``proj_out``. The model builds its key mask inside
``forward`` (local video + full text), so :func:`enable_ulysses` also registers a small hook on every
block that cuts it to this rank's text shard (:data:`HUNYUAN_MASK_HOOK`), and one on the transformer
that checks the sequence sizes (:data:`HUNYUAN_CHECK_HOOK`). With that, diffusers' own (stock, dense)
HunyuanVideo processor is exact under the plan as well. Enable it through :func:`enable_ulysses`:
``enable_parallelism(cp_plan=HUNYUAN_VIDEO_CP_PLAN)`` alone leaves the mask unsplit, which our processor
refuses with a ``ValueError`` and the stock one fails on.

Sequence lengths: like diffusers for Wan, shards are equal, so the video tokens (frames x height x width
after patchify) and the text tokens must both be divisible by N (HunyuanVideo's pipeline pads prompts to
256 tokens); otherwise a ``ValueError`` says so at the first forward. ``ulysses_anything=True``
(``ContextParallelConfig``; ``enable_ulysses(..., ulysses_anything=True)``) takes any lengths
(``tensor_split`` shards; forward only, as diffusers).

Supported (:data:`ULYSSES_FAMILIES`): Wan and LTX-Video (video-only self-attention, contiguous shards) and
HunyuanVideo (joint attention, reordered per rank as above; not its ``token_replace`` image-to-video
variant), Ulysses with any degree that divides the head count, ``mode="sparse"``. Everything else raises
``ValueError`` instead of computing something wrong: ring attention (``ring_degree > 1``), the other joint
text+video attention families (CogVideoX, Mochi, Flux: no cp plan here), ``mode="sla"``, and block reuse
that would skip the first block (it carries diffusers' sequence split).

Launching: :func:`launch` starts N processes with ``torch.multiprocessing`` (NCCL on CUDA, gloo on
CPU) and :func:`init_process_group` joins a ``torchrun`` launch; :func:`enable_ulysses` calls diffusers'
``enable_parallelism`` with the model's cp plan (dit-sparse's for HunyuanVideo) and works around its
CPU-only device lookup in diffusers 0.42, which divides by the accelerator count.

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
import functools
import os
import socket
from dataclasses import dataclass, replace
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

__all__ = [
    "HeadShard",
    "ULYSSES_FAMILIES",
    "NCCL_ENV",
    "context_parallel_config",
    "check_supported",
    "check_application",
    "propagate_parallel_config",
    "full_sequence_length",
    "full_joint_lengths",
    "ulysses_attend",
    "HUNYUAN_VIDEO_CP_PLAN",
    "HUNYUAN_MASK_HOOK",
    "HUNYUAN_CHECK_HOOK",
    "cp_plan_for",
    "enable_ulysses",
    "init_process_group",
    "launch",
]

# Families whose sparse attention is exact under Ulysses: video-only self-attention with contiguous shards
# (Wan, LTX-Video), and HunyuanVideo's joint attention, put back into canonical order per rank.
ULYSSES_FAMILIES = ("wan", "ltx", "hunyuan_video")

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
            f"text+video attention has no cp plan / shard reordering here); supported: "
            f"{', '.join(ULYSSES_FAMILIES)}. Run this model on one GPU or without dit-sparse"
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


def _rank_and_count(cp) -> tuple[int, int, bool]:
    mesh = cp._flattened_mesh
    return torch.distributed.get_rank(mesh.get_group()), mesh.size(), bool(cp.ulysses_anything)


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
    rank, count, uneven = _rank_and_count(cp)
    sizes = _shard_sizes(grid_len, count, uneven)
    if sizes is None or sizes[rank] != local_len:
        return None
    return grid_len


def full_joint_lengths(video_local: int, text_local: int, video_len: int, text_len: int, cp) -> tuple[int, int] | None:
    """``(video_len, text_len)`` when this rank holds its diffusers shard of both the video tokens
    (``video_local`` of ``video_len``) and the text tokens (``text_local`` of ``text_len``), else ``None``.

    Joint attention under Ulysses (HunyuanVideo with :data:`HUNYUAN_VIDEO_CP_PLAN`): each rank's sequence is
    ``[video_r, text_r]``. ``cp``: the ``ContextParallelConfig``.
    """
    rank, count, uneven = _rank_and_count(cp)
    videos, texts = _shard_sizes(video_len, count, uneven), _shard_sizes(text_len, count, uneven)
    if videos is None or texts is None or videos[rank] != video_local or texts[rank] != text_local:
        return None
    return video_len, text_len


def head_shard(cp) -> HeadShard:
    """This rank's :class:`HeadShard` in the Ulysses group of ``cp``."""
    return HeadShard(int(cp._ulysses_local_rank), int(cp.ulysses_degree))


def ulysses_attend(engine, plan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, parallel_config,
                   *, scale: float | None = None, text_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention of this rank's sequence shard through diffusers' templated Ulysses attention.

    Args:
        engine: the :class:`~dit_sparse.engine.SparseAttentionEngine`.
        plan: the engine's plan for this call, made for the FULL sequence (full grid, full text length).
        query, key, value: ``[B, S_local, H, D]`` (diffusers' layout), this rank's tokens, all heads. With
            text in the plan (joint attention) they are ``[video_r, text_r]`` (``[text_r, video_r]`` when
            the plan's layout has text first): this rank's shard of each, as :data:`HUNYUAN_VIDEO_CP_PLAN`
            splits them.
        parallel_config: the processor's ``ParallelConfig`` (Ulysses, ``ring_degree == 1``).
        text_valid: bool ``[B, T_local]``, False for padded text keys among THIS rank's text tokens.

    Returns ``[B, S_local, H, D]``. Inside, each rank runs ``engine.attend`` on ``[B, H / N, S, D]``
    (all tokens in canonical order, its head shard). Gradients flow (the per-rank backward
    differentiates the engine call, reordering included).
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
    tl = plan.token_layout
    order, attn_mask = None, None
    if tl.text_len > 0:
        order = _joint_order(tl.video_len, tl.text_len, int(cp.ulysses_degree), bool(cp.ulysses_anything),
                             tl.text_first, query.device)
        if text_valid is not None:
            # This rank's key mask; diffusers all-gathers a mask of the local key length along with the keys.
            ones = torch.ones(query.shape[0], query.shape[1] - text_valid.shape[1], dtype=torch.bool,
                              device=query.device)
            valid = text_valid.to(device=query.device, dtype=torch.bool).expand(query.shape[0], -1)
            parts = (valid, ones) if tl.text_first else (ones, valid)
            attn_mask = torch.cat(parts, dim=1)[:, None, None, :]
    elif text_valid is not None:
        raise ValueError("text_valid was given but the plan has no text tokens")
    return _templated_context_parallel_attention(
        query, key, value, attn_mask, 0.0, False, scale, False, False,
        forward_op=_engine_forward_op(engine, plan, order), backward_op=_engine_backward_op,
        _parallel_config=parallel_config,
    )


@dataclass(frozen=True)
class _JointOrder:
    """Gathered (rank-major ``[video_0, text_0, video_1, text_1, ...]``) <-> canonical (all video, then
    all text; text first when the layout says so) token order of joint attention under Ulysses."""

    canonical: torch.Tensor  # gathered index of each canonical position
    gathered: torch.Tensor  # canonical index of each gathered position (the inverse)
    text_first: bool
    video_len: int
    text_len: int


@functools.lru_cache(maxsize=32)
def _joint_order(video_len: int, text_len: int, count: int, uneven: bool, text_first: bool,
                 device: torch.device) -> _JointOrder:
    videos, texts = _shard_sizes(video_len, count, uneven), _shard_sizes(text_len, count, uneven)
    if videos is None or texts is None:
        raise ValueError(
            f"{video_len} video and {text_len} text tokens cannot be split evenly over ulysses_degree={count}; "
            f"both must be divisible by {count} (or use ContextParallelConfig(ulysses_anything=True))"
        )
    video_idx, text_idx, pos = [], [], 0
    for nv, nt in zip(videos, texts):
        firsts = ((text_idx, nt), (video_idx, nv)) if text_first else ((video_idx, nv), (text_idx, nt))
        for dest, n in firsts:
            dest.append(torch.arange(pos, pos + n))
            pos += n
    canonical = torch.cat(text_idx + video_idx if text_first else video_idx + text_idx)
    gathered = torch.argsort(canonical)
    return _JointOrder(canonical.to(device), gathered.to(device), text_first, video_len, text_len)


def _engine_forward_op(engine, plan, order: _JointOrder | None = None) -> Callable:
    """The per-rank op diffusers' Ulysses attention calls on ``[B, S, H_local, D]`` (gathered order)."""

    def attend(query, key, value, text_valid, scale):
        if order is not None:  # gathered -> canonical order (the order the token layout describes)
            query, key, value = (x.index_select(1, order.canonical) for x in (query, key, value))
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = engine.attend(plan, q, k, v, scale=scale, text_valid=text_valid).transpose(1, 2)
        if order is not None:
            out = out.index_select(1, order.gathered)
        return out

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("dit-sparse's Ulysses op does not return the log-sum-exp")
        text_valid = None
        if attn_mask is not None:
            if order is None:
                raise ValueError("dit-sparse's Ulysses op got an attention mask for video-only attention")
            # the all-gathered local key masks, [B, 1, 1, S] in gathered order -> canonical -> text part
            keep = attn_mask.reshape(attn_mask.shape[0], -1).index_select(1, order.canonical)
            text_valid = keep[:, : order.text_len] if order.text_first else keep[:, order.video_len:]
        needs_grad = _save_ctx and any(getattr(ctx, "needs_input_grad", (False,))[:3])
        if not needs_grad:
            return attend(query, key, value, text_valid, scale)
        with torch.enable_grad():  # keep the per-rank graph for backward_op (no recomputation)
            leaves = [x.detach().requires_grad_(True) for x in (query, key, value)]
            out = attend(*leaves, text_valid, scale)
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
    return tuple(grads)


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


# ---------------------------------------------------------------------------------------------- HunyuanVideo
_HUNYUAN_CLASS = "HunyuanVideoTransformer3DModel"
HUNYUAN_MASK_HOOK = "dit_sparse_cp_text_mask"
HUNYUAN_CHECK_HOOK = "dit_sparse_cp_sizes"


def _hunyuan_video_cp_plan(first_block: str = "transformer_blocks.0") -> dict:
    return {
        # video tokens: split right after the patch embedding, the rotary tables ([V, D] each) alike
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        # text tokens: split after the token refiner (whose self-attention needs all of them) and after
        # forward() built the key mask from the full text (HUNYUAN_MASK_HOOK then cuts it per rank)
        first_block: {"encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        # the video tokens come back together before the unpatchify (the text is dropped after the blocks)
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


# dit-sparse's context-parallel plan of diffusers' HunyuanVideoTransformer3DModel (diffusers 0.42 has none).
# enable_ulysses() uses it and registers the key-mask hook it needs (HUNYUAN_MASK_HOOK).
HUNYUAN_VIDEO_CP_PLAN = _hunyuan_video_cp_plan()


def _is_hunyuan_video(transformer) -> bool:
    return any(c.__name__ == _HUNYUAN_CLASS for c in type(transformer).__mro__)


def cp_plan_for(transformer):
    """The context-parallel plan :func:`enable_ulysses` uses for ``transformer``: dit-sparse's for
    HunyuanVideo (:data:`HUNYUAN_VIDEO_CP_PLAN`; its first single-stream block carries the text split when
    the model has no dual-stream blocks), otherwise the model's own ``_cp_plan`` (``None`` if it has none)."""
    if _is_hunyuan_video(transformer):
        if len(getattr(transformer, "transformer_blocks", ())) > 0:
            return HUNYUAN_VIDEO_CP_PLAN
        return _hunyuan_video_cp_plan("single_transformer_blocks.0")
    return getattr(transformer, "_cp_plan", None)


class _HunyuanSizeCheckHook(ModelHook):
    """On the transformer: a clear ``ValueError`` when the sequence cannot be split as the plan splits it
    (diffusers itself would stop at an assertion inside the split)."""

    def __init__(self, cp):
        super().__init__()
        self.cp = cp

    def pre_forward(self, module, *args, **kwargs):
        from .processors._base import bind_forward_args

        bound = bind_forward_args(module, args, kwargs)
        x, text = bound.get("hidden_states"), bound.get("encoder_hidden_states")
        if x is None or text is None or x.dim() != 5:
            return args, kwargs
        cfg = module.config
        f, h, w = x.shape[2] // cfg.patch_size_t, x.shape[3] // cfg.patch_size, x.shape[4] // cfg.patch_size
        n_video, n_text = f * h * w, text.shape[1]
        _, count, uneven = _rank_and_count(self.cp)
        if uneven:
            if n_video < count or n_text < count:
                raise ValueError(
                    f"HunyuanVideo under Ulysses context parallelism over {count} ranks needs at least {count} "
                    f"video and {count} text tokens; got {n_video} video ({f}x{h}x{w} after patchify) and "
                    f"{n_text} text tokens"
                )
            return args, kwargs
        bad = [f"{n} {what} tokens{extra}" for n, what, extra in
               ((n_video, "video", f" ({f}x{h}x{w} after patchify)"), (n_text, "text", "")) if n % count]
        if bad:
            raise ValueError(
                f"HunyuanVideo under Ulysses context parallelism splits its video tokens and its text tokens into "
                f"{count} equal shards (diffusers' equal split, as for Wan), so both counts must be divisible by "
                f"{count}; {' and '.join(bad)} are not. Use a frame count / resolution whose frames x height x "
                f"width token count is divisible by {count} (720p: 45x80 tokens per frame), pad the prompt to a "
                f"multiple of {count} tokens (the pipeline's max_sequence_length=256 does), or enable "
                f"ContextParallelConfig(ulysses_anything=True) (enable_ulysses(..., ulysses_anything=True)), "
                f"which takes any lengths (forward only)"
            )
        return args, kwargs


class _HunyuanTextMaskHook(ModelHook):
    """On every HunyuanVideo block: cut the key mask the model's ``forward`` built, ``[B, 1, 1, V_r + T]``
    (this rank's video tokens, the FULL text), to this rank's tokens ``[B, 1, 1, V_r + T_r]``; diffusers'
    Ulysses attention all-gathers such a local mask in the order of the keys."""

    def __init__(self, cp):
        super().__init__()
        self.cp = cp
        self._index = None

    def initialize_hook(self, module):
        import inspect

        names = list(inspect.signature(type(module).forward).parameters)[1:]
        self._index = {n: i for i, n in enumerate(names)}
        return module

    def _get(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self._index.get(name)
        return args[i] if i is not None and i < len(args) else None

    def pre_forward(self, module, *args, **kwargs):
        mask = self._get("attention_mask", args, kwargs)
        hidden, text = self._get("hidden_states", args, kwargs), self._get("encoder_hidden_states", args, kwargs)
        if mask is None or hidden is None or text is None:
            return args, kwargs
        rank, count, uneven = _rank_and_count(self.cp)
        n_video = hidden.shape[1]
        n_text = mask.shape[-1] - n_video
        sizes = _shard_sizes(n_text, count, uneven)
        if sizes is None or text.shape[1] not in (n_text, sizes[rank]):
            raise ValueError(
                f"HunyuanVideo context parallelism: the attention mask ({mask.shape[-1]} keys) does not match this "
                f"rank's {n_video} video and {text.shape[1]} text tokens; enable it with "
                f"dit_sparse.parallel.enable_ulysses (HUNYUAN_VIDEO_CP_PLAN)"
            )
        start = n_video + sum(sizes[:rank])
        local = torch.cat([mask[..., :n_video], mask[..., start: start + sizes[rank]]], dim=-1)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = local
        else:
            args = list(args)
            args[self._index["attention_mask"]] = local
            args = tuple(args)
        return args, kwargs


def _register_hunyuan_hooks(transformer) -> None:
    cp = transformer._parallel_config.context_parallel_config
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_HunyuanSizeCheckHook(cp), HUNYUAN_CHECK_HOOK)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, ()):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_HunyuanTextMaskHook(cp), HUNYUAN_MASK_HOOK)


def enable_ulysses(transformer, degree: int | None = None, *, cp_plan=None, ulysses_anything: bool = False):
    """``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=...)``.

    ``degree`` defaults to the world size of the initialised process group. ``cp_plan`` defaults to
    :func:`cp_plan_for` (the model's own, or dit-sparse's :data:`HUNYUAN_VIDEO_CP_PLAN` for HunyuanVideo,
    with whose plan the key-mask and size-check hooks are registered too). ``ulysses_anything``: diffusers'
    uneven split (any sequence length; forward only). Raises ``ValueError`` when ``torch.distributed`` is
    not initialised, ``degree`` does not divide the attention head count, or for HunyuanVideo's
    ``token_replace`` image-to-video variant (its first-frame tokens are located by position in the
    unsplit sequence). Works on CPU (gloo) too. Returns the transformer.
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
    hunyuan_hooks = False
    if _is_hunyuan_video(transformer):
        if getattr(transformer.config, "image_condition_type", None) == "token_replace":
            raise ValueError(
                "HunyuanVideo with image_condition_type='token_replace' (image-to-video) is not supported under "
                "context parallelism: its blocks treat the first frame's tokens by position in the full sequence"
            )
        ours = cp_plan_for(transformer)
        if cp_plan is None:
            cp_plan = ours
        hunyuan_hooks = cp_plan == ours
    config = ContextParallelConfig(ulysses_degree=degree, ulysses_anything=ulysses_anything)
    with _cpu_device_count():
        transformer.enable_parallelism(config=config, cp_plan=cp_plan)
    if hunyuan_hooks:
        _register_hunyuan_hooks(transformer)
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
