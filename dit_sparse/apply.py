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
``transformer.sparse_attention_stats()``. Processors that hold weights (IP-adapter) are left as they
are and listed in ``stats()["skipped"]``. Removing restores the original processor objects exactly and
removes the hook and the stats method. Applying again first removes the previous application. The
caller's config is never modified (the application works on a copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SparseAttentionConfig
from .engine import SparseAttentionEngine

__all__ = ["apply_sparse_attention", "remove_sparse_attention", "attach_processor"]

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
        ValueError: unsupported model (the message lists the supported classes) or bad config.
    """
    if config is None:
        config = SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise ValueError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be None or an int >= 1, got {num_steps!r}")
    transformers, scheduler = _transformers_and_scheduler(pipe_or_transformer)
    families = [_family_or_raise(t) for t in transformers]
    engine = SparseAttentionEngine(config.copy(), num_steps=num_steps)
    for i, (transformer, family) in enumerate(zip(transformers, families)):
        remove_sparse_attention(transformer)
        prefix = "" if i == 0 else f"transformer_{i + 1}."
        replace, layers = _plan_modules(transformer, family, engine, prefix)
        engine.add_layers(layers)
        proc = family.processor_cls().bind(engine)
        originals = {}
        for name, module in replace:
            originals[name] = module.processor
            _set_processor(module, proc)
        _attach(transformer, engine, family, scheduler, originals)
    return transformers[0]


def _attach(transformer, engine, family, scheduler, originals) -> None:
    from .hooks import register_hook

    register_hook(transformer, engine, family, scheduler)
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
    sparse = family.processor_cls().bind(engine)
    replaced = {id(m) for _, m in replace}
    handlers = {}
    for name, module in _attention_modules(transformer):
        handlers[id(module)] = sparse if id(module) in replaced else family.stock_processor(name, module)
    processor.set_handlers(handlers)
    _attach(transformer, engine, family, None, {})


def remove_sparse_attention(pipe_or_transformer):
    """Undo :func:`apply_sparse_attention`: original processors back, hook and stats method removed.

    Returns the transformer. A transformer without dit-sparse is returned unchanged. A transformer that
    got a :class:`~dit_sparse.processors.SparseAttnProcessor` through ``set_attn_processor`` gets fresh
    stock processors (the ones it had before were never seen by dit-sparse).
    """
    from .hooks import remove_hook
    from .processors.generic import SparseAttnProcessor

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
        remove_hook(transformer)
    return transformers[0]
