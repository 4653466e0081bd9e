"""The :class:`~dit_sparse.sla.SparseLinearAttention` modules of ``mode="sla"``: create, load, list, remove.

``apply_sparse_attention(..., SparseAttentionConfig(mode="sla"))`` gives every self-attention module it
replaces (and whose head dim the kernels cover) one ``SparseLinearAttention``, registered as the
submodule ``attn.sla`` of that attention module: it moves with ``transformer.to()``, its projection is
in ``transformer.parameters()`` (trainable, e.g. by ``dit-sparse finetune``) and the engine calls it for
the layer's sparse steps. ``remove_sparse_attention`` deletes them.

Weights: ``sla_weights`` names a file of :func:`dit_sparse.sla.save_sla_weights`, whose keys are
attention module paths (``blocks.0.attn1``; ``transformer_2.blocks.0.attn1`` for the second expert of
Wan 2.2). Every SLA layer must be in the file and every file entry must be an SLA layer of the model;
each entry's head dim, block size and feature map must match the module it loads into. ``sla_topk`` and
``sla_feature_map`` left ``None`` take the file's values (else 0.05 and ``"softmax"``).
"""

from __future__ import annotations

import torch

from .sla import SparseLinearAttention, load_sla_weights

__all__ = [
    "SLA_ATTR",
    "DEFAULT_TOPK",
    "DEFAULT_FEATURE_MAP",
    "head_dim_of",
    "load_weights_file",
    "build_sla_modules",
    "check_all_used",
    "attach_sla_modules",
    "sla_modules",
    "remove_sla_modules",
]

SLA_ATTR = "sla"
DEFAULT_TOPK = 0.05
DEFAULT_FEATURE_MAP = "softmax"


def head_dim_of(attn) -> int | None:
    """Head dim of a diffusers attention module (``None`` when it cannot be read)."""
    d = getattr(attn, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    heads, to_q = getattr(attn, "heads", None), getattr(attn, "to_q", None)
    if isinstance(heads, int) and heads > 0 and isinstance(to_q, torch.nn.Linear):
        return to_q.out_features // heads
    return None


def load_weights_file(config) -> dict[str, SparseLinearAttention] | None:
    """The modules stored in ``config.sla_weights`` (CPU), or ``None`` without a file."""
    return None if config.sla_weights is None else load_sla_weights(config.sla_weights)


def build_sla_modules(modules: list[tuple[str, torch.nn.Module]], config, supported_head_dims, prefix: str = "",
                      stored: dict[str, SparseLinearAttention] | None = None) -> dict[str, SparseLinearAttention]:
    """One ``SparseLinearAttention`` per ``(name, attention module)`` whose head dim is supported, on that
    module's device and dtype, with ``stored[prefix + name]``'s weights when ``stored`` is given.

    Returns ``{name: module}`` (names as given, without ``prefix``); registers nothing.

    Raises:
        ValueError: a layer missing from ``stored``, or a stored entry whose head dim, block size or
            feature map differs from the module it would load into.
    """
    out = {}
    for name, attn in modules:
        d = head_dim_of(attn)
        if d not in supported_head_dims:
            continue
        saved = None if stored is None else stored.get(prefix + name)
        if stored is not None and saved is None:
            raise ValueError(
                f"the SLA weights file {config.sla_weights!r} has no entry for layer {prefix + name!r}; it was "
                f"written for another model (its layers: {_preview(stored)})"
            )
        topk = config.sla_topk if config.sla_topk is not None else (saved.topk if saved else DEFAULT_TOPK)
        fmap = config.sla_feature_map or (saved.feature_map if saved else DEFAULT_FEATURE_MAP)
        module = SparseLinearAttention(d, topk=topk, block_q=config.block_size, block_kv=config.block_size,
                                       feature_map=fmap, backend=config.backend)
        if saved is not None:
            _check_match(prefix + name, saved, module, config)
            with torch.no_grad():
                module.proj.weight.copy_(saved.proj.weight)
        param = next(attn.parameters(), None)
        if param is not None:
            module.to(device=param.device, dtype=param.dtype)
        out[name] = module
    return out


def _check_match(name: str, saved: SparseLinearAttention, module: SparseLinearAttention, config) -> None:
    where = f"layer {name!r} of the SLA weights file {config.sla_weights!r}"
    if saved.head_dim != module.head_dim:
        raise ValueError(f"{where} has head_dim {saved.head_dim} but the model's layer has {module.head_dim}; "
                         f"the file is for another model")
    if (saved.block_q, saved.block_kv) != (module.block_q, module.block_kv):
        raise ValueError(f"{where} was trained with block size {saved.block_q}; set block_size={saved.block_q}")
    if saved.feature_map != module.feature_map:
        raise ValueError(f"{where} was trained with feature map {saved.feature_map!r}; set "
                         f"sla_feature_map={saved.feature_map!r} or leave it None")


def check_all_used(stored: dict[str, SparseLinearAttention] | None, used: set[str], path) -> None:
    """Raise ``ValueError`` when the weights file holds layers the model does not have."""
    if stored is None:
        return
    extra = sorted(set(stored) - used)
    if extra:
        raise ValueError(
            f"the SLA weights file {path!r} has layers this model does not run SLA on: {_preview(extra)}; it was "
            f"written for another model (or other skip_layers)"
        )


def _preview(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def attach_sla_modules(transformer, built: dict[str, SparseLinearAttention]) -> None:
    """Register each module as ``<attention module>.sla``."""
    for name, module in built.items():
        setattr(transformer.get_submodule(name), SLA_ATTR, module)


def sla_modules(transformer) -> dict[str, SparseLinearAttention]:
    """``{attention module path: SparseLinearAttention}`` of ``transformer``, in model order.

    The SLA modules ``apply_sparse_attention(..., mode="sla")`` registered (empty for other modes);
    ``save_sla_weights(sla_modules(transformer), path)`` writes a file ``sla_weights=`` loads.
    """
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"sla_modules expects a transformer module, got {type(transformer).__name__}; pass "
                         f"pipe.transformer")
    out = {}
    for name, module in transformer.named_modules():
        sla = module._modules.get(SLA_ATTR) if name else None
        if isinstance(sla, SparseLinearAttention):
            out[name] = sla
    return out


def remove_sla_modules(transformer) -> int:
    """Delete every ``<attention module>.sla`` under ``transformer``; returns how many."""
    names = list(sla_modules(transformer))
    for name in names:
        delattr(transformer.get_submodule(name), SLA_ATTR)
    return len(names)
