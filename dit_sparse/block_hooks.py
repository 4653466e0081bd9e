"""The transformer-block hooks of block-level step caching (``reuse_scope="block"``).

:func:`plan_block_hooks` checks a model and describes its blocks (the family's ``block_lists``, in
execution order), :func:`add_block_hooks` registers a :class:`BlockReuseHook` on each through diffusers'
``HookRegistry``;
:func:`remove_block_hooks` takes them off again and leaves each block as it found it. Each hook asks
the engine's :class:`~dit_sparse.block_cache.BlockCache` whether the current step computes or reuses
the block and either runs the block (keeping ``output - input`` when a reuse run follows) or returns
``input + kept residual`` without running it. The return positions of the hidden and text streams
and their argument names come from diffusers' ``TransformerBlockRegistry``. See
``dit_sparse/block_cache.py`` for the method and its memory cost.

The decisions run outside ``torch.compile`` (``torch.compiler.disable``); the block itself runs where
the caller runs it.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .block_cache import BlockInfo, KeptResiduals
from .processors._base import bind_forward_args

__all__ = [
    "BLOCK_HOOK_NAME",
    "BlockReuseHook",
    "transformer_blocks",
    "plan_block_hooks",
    "add_block_hooks",
    "remove_block_hooks",
]

BLOCK_HOOK_NAME = "dit_sparse_block_reuse"


class BlockReuseHook(ModelHook):
    """Runs or skips one transformer block as the engine's block schedule says.

    Args:
        engine: the shared :class:`~dit_sparse.engine.SparseAttentionEngine` (its ``block_cache`` and
            the current call's step and branch).
        info: this block's :class:`BlockInfo`.
    """

    def __init__(self, engine, info: BlockInfo):
        super().__init__()
        self.engine = engine
        self.info = info
        # set by add_block_hooks so that removing can leave the module as it found it
        self.created_registry = False
        self.had_forward_attr = False

    def new_forward(self, module, *args, **kwargs):
        action, key, step, kept, inputs = self._before(module, args, kwargs)
        if action == "reuse":
            return self._reused(inputs, kept)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if action == "store":
            self._store(key, step, inputs, output)
        return output

    @torch.compiler.disable
    def _before(self, module, args, kwargs):
        """``(action, key, step, kept, inputs)``; action: ``"compute"``, ``"store"`` or ``"reuse"``;
        ``inputs`` (hidden, encoder) only when storing or reusing."""
        engine, info = self.engine, self.info
        cache = engine.block_cache
        call = engine.active_call
        if call is None or cache is None:
            return "compute", None, None, None, None
        step = call.step
        if info.always_compute:
            cache.count(step, reused=False)
            return "compute", None, step, None, None
        decision = cache.decide(step, engine.schedule_num_steps(call))
        key = (info.name, call.branch)
        if decision.mode == "reuse":
            inputs = self._inputs(module, args, kwargs)
            kept = cache.lookup(key, step, inputs)
            if kept is not None:
                cache.count(step, reused=True, attention_layers=info.attention_layers)
                return "reuse", key, step, kept, inputs
            # nothing fitting was kept: compute, and keep this residual for the rest of the reuse run
            cache.count(step, reused=False, fallback=True)
            return "store", key, step, None, inputs
        cache.count(step, reused=False)
        if decision.store_output:
            return "store", key, step, None, self._inputs(module, args, kwargs)
        return "compute", key, step, None, None

    def _inputs(self, module, args, kwargs) -> tuple:
        bound = bind_forward_args(module, args, kwargs)
        hidden = bound.get(self.info.hidden_arg)
        encoder = bound.get(self.info.encoder_arg) if self.info.encoder_index is not None else None
        return hidden, encoder

    @torch.compiler.disable
    def _store(self, key, step, inputs, output) -> None:
        info = self.info
        hidden_in, encoder_in = inputs
        if isinstance(output, torch.Tensor):
            self.engine.block_cache.store(key, (output - hidden_in, None), None, step)
            return
        if not isinstance(output, (tuple, list)) or info.encoder_index is None or len(output) != 2:
            raise ValueError(
                f"block {info.name} returned {type(output).__name__}"
                f"{f' of {len(output)} items' if isinstance(output, (tuple, list)) else ''}; block reuse handles "
                f"blocks returning hidden states or (hidden, encoder) states - use reuse_scope='attention'"
            )
        r_hidden = output[info.hidden_index] - hidden_in
        r_encoder = output[info.encoder_index] - encoder_in
        self.engine.block_cache.store(key, (r_hidden, r_encoder), len(output), step)

    def _reused(self, inputs, kept: KeptResiduals):
        hidden_in, encoder_in = inputs
        r_hidden, r_encoder = kept.residuals
        hidden = hidden_in + r_hidden
        if kept.arity is None:
            return hidden
        out = [None] * kept.arity
        out[self.info.hidden_index] = hidden
        out[self.info.encoder_index] = encoder_in + r_encoder
        return tuple(out)


def transformer_blocks(transformer, family) -> list[tuple[str, torch.nn.Module]]:
    """``[(name, block)]`` of ``transformer`` in execution order (the family's ``block_lists``)."""
    out = []
    for list_name in family.block_lists:
        blocks = getattr(transformer, list_name, None)
        if blocks is None:
            continue
        out.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
    return out


def _resolve_indices(indices: tuple[int, ...], count: int, model: str) -> frozenset[int]:
    out = set()
    for i in indices:
        r = i + count if i < 0 else i
        if not 0 <= r < count:
            raise ValueError(
                f"always_compute_blocks index {i} is out of range for the {count} transformer blocks of {model}; "
                f"use indices in [{-count}, {count - 1}]"
            )
        out.add(r)
    return frozenset(out)


def _block_metadata(block):
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise ValueError(
            f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry, so dit-sparse does not know "
            f"where its outputs are; use reuse_scope='attention' for this model"
        ) from None


def plan_block_hooks(transformer, engine, family, prefix: str = "") -> list[tuple[torch.nn.Module, BlockInfo]]:
    """``[(block, BlockInfo)]`` for every transformer block of ``transformer``; changes nothing.

    Call it after the engine knows the transformer's self-attention layers (``engine.add_layers``): each
    block counts the layers inside it, for the statistics. Block names get ``prefix``
    (``"transformer_2."`` for a second expert sharing the engine).

    Raises:
        ValueError: the transformer has no blocks in the family's ``block_lists``, a block class diffusers
            does not describe, or an ``always_compute_blocks`` index out of range.
    """
    blocks = transformer_blocks(transformer, family)
    model = type(transformer).__name__
    if not blocks:
        raise ValueError(f"{model} has no transformer blocks in {family.block_lists}; use reuse_scope='attention'")
    always = _resolve_indices(engine.config.always_compute_blocks, len(blocks), model)
    planned = []
    for i, (name, block) in enumerate(blocks):
        meta = _block_metadata(block)
        planned.append((block, BlockInfo(
            index=i, name=prefix + name, count=len(blocks), always_compute=i in always,
            hidden_index=meta.return_hidden_states_index, encoder_index=meta.return_encoder_hidden_states_index,
            hidden_arg=meta.hidden_states_argument_name, encoder_arg=meta.encoder_hidden_states_argument_name,
            attention_layers=sum(1 for m in block.modules() if engine.layer_of(m) is not None),
        )))
    return planned


def add_block_hooks(transformer, engine, planned: list[tuple[torch.nn.Module, BlockInfo]]) -> int:
    """Register a :class:`BlockReuseHook` on each block of ``planned`` (from :func:`plan_block_hooks`);
    returns the count. An earlier dit-sparse block hook on a block is replaced."""
    for block, info in planned:
        hook = BlockReuseHook(engine, info)
        _remove_from(block)
        hook.created_registry = "_diffusers_hook" not in block.__dict__
        hook.had_forward_attr = "forward" in block.__dict__
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return len(planned)


def _remove_from(module) -> bool:
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return False
    hook = registry.get_hook(BLOCK_HOOK_NAME)
    if hook is None:
        return False
    registry.remove_hook(BLOCK_HOOK_NAME, recurse=False)
    if not registry.hooks and hook.created_registry:
        # leave the module as it was before the first hook: no registry, the class's forward
        del module._diffusers_hook
        if not hook.had_forward_attr:
            module.__dict__.pop("forward", None)
    return True


def remove_block_hooks(transformer) -> int:
    """Remove every dit-sparse block hook under ``transformer``; returns how many there were."""
    removed = sum(_remove_from(m) for m in transformer.modules())
    registry = transformer.__dict__.get("_diffusers_hook")
    if removed and registry is not None:
        registry.invalidate_child_registries_cache()
    return removed
