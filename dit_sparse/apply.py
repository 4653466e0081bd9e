"""`apply_sparse_attention` / `remove_sparse_attention`: switch a diffusers pipeline or transformer to
dit-sparse attention and back.

Example::

    from dit_sparse import SparseAttentionConfig, apply_sparse_attention, remove_sparse_attention

    apply_sparse_attention(pipe, SparseAttentionConfig.preset("fast"))   # pipe or pipe.transformer
    video = pipe(prompt, num_frames=81, height=480, width=832).frames[0]
    print(pipe.transformer.sparse_attention_stats())                     # density, cache hits, time
    remove_sparse_attention(pipe)                                        # back to stock processors

Applying registers the dit-sparse hook on the transformer (both experts of Wan 2.2, sharing one
engine), puts the family's sparse processor on every self / joint attention module (cross-attention
modules keep theirs), remembers the original processor objects and attaches
``transformer.sparse_attention_stats()``. With ``reuse_scope="block"`` it also registers a block hook
on every transformer block (``dit_sparse/block_hooks.py``); with ``mode="sla"`` every replaced module
gets a ``SparseLinearAttention`` submodule ``attn.sla`` (``dit_sparse/sla_layers.py``; listed by
:func:`sla_modules`). Processors that hold weights (IP-adapter) are left as they are and listed in
``stats()["skipped"]``. Under diffusers' context parallelism (``enable_parallelism`` before or after
applying) the processors get the transformer's parallel config, and configurations the sparse path
cannot compute exactly raise ``ValueError`` (``dit_sparse/parallel.py``). Removing restores the original processor objects exactly and removes the
hooks, the SLA modules and the stats method. Applying again first removes the previous application.
The caller's config is never modified (the application works on a copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SparseAttentionConfig
from .engine import SparseAttentionEngine
from .parallel import check_application, propagate_parallel_config
from .sla_layers import sla_modules

__all__ = ["apply_sparse_attention", "remove_sparse_attention", "attach_processor", "sla_modules"]

_STATE_ATTR = "_dit_sparse_application"
_STATS_ATTR = "sparse_attention_stats"


@dataclass
class _Application:
    engine: SparseAttentionEngine
    family: object
    originals: dict  # module name -> original processor object (only for modules we replaced)


def _transformers_and_scheduler(obj) -> tuple[list, object]:
    if isinstance(obj, torch.nn.Module):
        return [obj], None
    if hasattr(obj, "components") or hasattr(obj, "transformer"):
        found = [getattr(obj, name, None) for name in ("transformer", "transformer_2")]
        found = [t for t in found if isinstance(t, torch.nn.Module)]
        if found:
            return found, getattr(obj, "scheduler", None)
    raise ValueError(
        f"expected a diffusers pipeline with a .transformer or a transformer module, got {type(obj).__name__}"
    )


def _family_or_raise(transformer):
    from .processors.registry import family_of, supported_transformer_classes

    family = family_of(transformer)
    if family is None:
        raise ValueError(
            f"{type(transformer).__name__} is not supported by dit-sparse; supported transformers: "
            f"{', '.join(supported_transformer_classes())}"
        )
    return family


def _attention_modules(transformer):
    for name, module in transformer.named_modules():
        proc = getattr(module, "processor", None)
        if name and proc is not None and callable(proc) and not isinstance(module, type):
            yield name, module


def _holds_weights(proc) -> bool:
    return isinstance(proc, torch.nn.Module) and any(True for _ in proc.parameters())


def _set_processor(module, proc) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(proc)
    else:  # Mochi's attention modules have no set_processor
        module.processor = proc


def _plan_modules(transformer, family, engine, prefix: str):
    """(self-attention modules to replace, their layer infos, modules to leave as they are)."""
    replace, layers = [], []
    index = 0
    for name, module in _attention_modules(transformer):
        if not family.is_self_attention(name, module):
            continue
        full = prefix + name
        layers.append((full, module))
        if index in engine.config.skip_layers:
            engine.skipped[full] = "skip_layers"
        elif _holds_weights(module.processor):
            engine.skipped[full] = f"processor {type(module.processor).__name__} holds weights (IP-adapter); left intact"
        else:
            replace.append((name, module))
        index += 1
    return replace, layers


def apply_sparse_attention(pipe_or_transformer, config: SparseAttentionConfig | None = None, *,
                           num_steps: int | None = None):
    """Use dit-sparse attention in a diffusers pipeline or transformer; returns the transformer.

    Args:
        pipe_or_transformer: a pipeline with ``.transformer`` (and ``.transformer_2`` for Wan 2.2) or a
            supported transformer (Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi, Flux).
        config: a :class:`SparseAttentionConfig` (copied, never modified); default
            ``SparseAttentionConfig()``.
        num_steps: number of denoising steps, needed for a fractional ``dense_steps`` when applying to
            a bare transformer called outside a pipeline that reports it.

    Raises:
        ValueError: unsupported model (the message lists the supported classes), bad config, or an
            ``sla_weights`` file that does not fit the model. Raised before any module is changed
            (beyond removing an earlier application).
    """
    if config is None:
        config = SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise ValueError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be None or an int >= 1, got {num_steps!r}")
    transformers, scheduler = _transformers_and_scheduler(pipe_or_transformer)
    families = [_family_or_raise(t) for t in transformers]
    for transformer, family in zip(transformers, families):
        check_application(transformer, family.name, config)  # context parallelism it cannot compute exactly
    engine = SparseAttentionEngine(config.copy(), num_steps=num_steps)
    stored = _stored_sla(engine)
    # Plan everything first: a bad model / config / weights file raises before a processor is replaced.
    plans = []
    for i, (transformer, family) in enumerate(zip(transformers, families)):
        remove_sparse_attention(transformer)
        prefix = "" if i == 0 else f"transformer_{i + 1}."
        replace, layers = _plan_modules(transformer, family, engine, prefix)
        engine.add_layers(layers)
        blocks = _plan_blocks(transformer, engine, family, prefix)
        sla = _build_sla(replace, engine, prefix, stored)
        plans.append((transformer, family, prefix, replace, blocks, sla))
    _check_sla_file_used(stored, {prefix + name for _, _, prefix, _, _, sla in plans for name in sla}, engine)
    for transformer, family, prefix, replace, blocks, sla in plans:
        proc = family.processor_cls().bind(engine)
        originals = {}
        for name, module in replace:
            originals[name] = module.processor
            _set_processor(module, proc)
        _install_sla(transformer, engine, sla, prefix)
        _attach(transformer, engine, family, scheduler, originals, blocks)
        propagate_parallel_config(transformer)
    return transformers[0]


def _stored_sla(engine):
    """``mode="sla"``: the modules of the ``sla_weights`` file (``None`` without one / in other modes)."""
    if engine.config.mode != "sla":
        return None
    from .sla_layers import load_weights_file

    return load_weights_file(engine.config)


def _build_sla(replace, engine, prefix: str, stored) -> dict:
    """``mode="sla"``: a SparseLinearAttention per replaced module (not registered yet); else ``{}``."""
    if engine.config.mode != "sla":
        return {}
    from .engine import SUPPORTED_HEAD_DIMS
    from .sla_layers import build_sla_modules

    return build_sla_modules(replace, engine.config, SUPPORTED_HEAD_DIMS, prefix, stored)


def _check_sla_file_used(stored, used: set, engine) -> None:
    if stored is not None:
        from .sla_layers import check_all_used

        check_all_used(stored, used, engine.config.sla_weights)


def _install_sla(transformer, engine, sla: dict, prefix: str) -> None:
    if sla:
        from .sla_layers import attach_sla_modules

        attach_sla_modules(transformer, sla)
        engine.add_sla_modules(sla, prefix)


def _plan_blocks(transformer, engine, family, prefix: str):
    """The blocks to hook for block-level step caching (``None`` unless ``reuse_scope="block"``)."""
    if engine.block_cache is None:
        return None
    from .block_hooks import plan_block_hooks

    return plan_block_hooks(transformer, engine, family, prefix)


def _attach(transformer, engine, family, scheduler, originals, blocks) -> None:
    from .block_hooks import add_block_hooks
    from .hooks import register_hook

    register_hook(transformer, engine, family, scheduler)
    if blocks is not None:
        add_block_hooks(transformer, engine, blocks)
    setattr(transformer, _STATE_ATTR, _Application(engine, family, originals))
    setattr(transformer, _STATS_ATTR, engine.stats)


def attach_processor(transformer, processor) -> None:
    """Attach a one-instance :class:`~dit_sparse.processors.SparseAttnProcessor` already set on every
    attention module of ``transformer`` (``set_attn_processor``): register the hook and tell the
    processor which module each family or stock processor computes."""
    from .hooks import remove_hook

    family = _family_or_raise(transformer)
    engine = processor.engine
    if hasattr(transformer, _STATE_ATTR):
        delattr(transformer, _STATE_ATTR)
    remove_hook(transformer)
    replace, layers = _plan_modules(transformer, family, engine, "")
    engine.add_layers(layers)
    blocks = _plan_blocks(transformer, engine, family, "")
    stored = _stored_sla(engine)
    sla = _build_sla(replace, engine, "", stored)
    _check_sla_file_used(stored, set(sla), engine)
    _install_sla(transformer, engine, sla, "")
    sparse = family.processor_cls().bind(engine)
    replaced = {id(m) for _, m in replace}
    handlers = {}
    for name, module in _attention_modules(transformer):
        handlers[id(module)] = sparse if id(module) in replaced else family.stock_processor(name, module)
    processor.set_handlers(handlers)
    _attach(transformer, engine, family, None, {}, blocks)
    propagate_parallel_config(transformer, handlers.values())


def remove_sparse_attention(pipe_or_transformer):
    """Undo :func:`apply_sparse_attention`: original processors back, hooks and stats method removed.

    Returns the transformer. A transformer without dit-sparse is returned unchanged. A transformer that
    got a :class:`~dit_sparse.processors.SparseAttnProcessor` through ``set_attn_processor`` gets fresh
    stock processors (the ones it had before were never seen by dit-sparse).
    """
    from .block_hooks import remove_block_hooks
    from .hooks import remove_hook
    from .processors.generic import SparseAttnProcessor
    from .sla_layers import remove_sla_modules

    transformers, _ = _transformers_and_scheduler(pipe_or_transformer)
    for transformer in transformers:
        app = getattr(transformer, _STATE_ATTR, None)
        if app is not None:
            for name, proc in app.originals.items():
                _set_processor(transformer.get_submodule(name), proc)
            for name, module in _attention_modules(transformer):
                if isinstance(module.processor, SparseAttnProcessor):
                    _set_processor(module, app.family.stock_processor(name, module))
            delattr(transformer, _STATE_ATTR)
        if _STATS_ATTR in transformer.__dict__:
            delattr(transformer, _STATS_ATTR)
        remove_block_hooks(transformer)
        remove_sla_modules(transformer)
        remove_hook(transformer)
        propagate_parallel_config(transformer)  # restored processors predating enable_parallelism
    return transformers[0]
