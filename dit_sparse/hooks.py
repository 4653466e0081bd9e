"""The transformer hook of dit-sparse: tells the attention processors what each forward looks like.

:class:`SparseAttentionHook` is a diffusers ``ModelHook`` registered through ``HookRegistry`` on the
transformer under :data:`HOOK_NAME`. In ``pre_forward`` it reads, from the forward's own arguments,
the latent shape and patch size (the token grid), the number of text tokens inside joint attention and
the timestep, and hands them to the shared :class:`~dit_sparse.engine.SparseAttentionEngine`, which
advances its step state (distinct timesteps are steps; a second forward at the same timestep is the
next CFG branch). The diffusers cache context (``transformer.cache_context("cond", step_index=...)``,
set by pipelines) is received like diffusers' own stateful hooks receive it and gives the step index
and step count when the pipeline provides them.

State is reset between generations: diffusers calls ``reset_state`` at the end of every pipeline call
(``maybe_free_model_hooks``), and the engine also starts over when the timestep goes up again.

The hook methods are excluded from ``torch.compile`` (``torch.compiler.disable``): they read Python
state and make one small host copy of the timestep per forward, so they run eagerly between compiled
regions.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from .processors._base import bind_forward_args

__all__ = ["SparseAttentionHook", "HOOK_NAME", "register_hook", "remove_hook", "get_hook"]

HOOK_NAME = "dit_sparse_attention"


class _ContextReceiver(StateManager):
    """Receives diffusers' cache context (``_set_cache_context`` looks for ``StateManager`` attributes)."""

    def __init__(self):
        super().__init__(object)

    @property
    def current(self):
        return self._context


class SparseAttentionHook(ModelHook):
    """Feeds the engine the token grid, text length and denoising position of every transformer forward.

    Args:
        engine: the shared :class:`~dit_sparse.engine.SparseAttentionEngine`.
        family: the transformer's :class:`~dit_sparse.processors._base.Family`.
        scheduler: the pipeline's scheduler, when applied through a pipeline: its ``timesteps`` give
            the number of steps when the pipeline does not pass it in the cache context.
    """

    _is_stateful = True

    def __init__(self, engine, family, scheduler=None):
        super().__init__()
        self.engine = engine
        self.family = family
        self.scheduler = scheduler
        self.cache_context = _ContextReceiver()
        self._timer = None
        # set by register_hook so that removing can leave the transformer as it found it
        self.created_registry = False
        self.had_forward_attr = False

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        bound = bind_forward_args(module, args, kwargs)
        grid, text_len, timestep = self.family.call_info(module, bound)
        ctx = self.cache_context.current
        step_index = getattr(ctx, "step_index", None)
        num_steps = getattr(ctx, "num_inference_steps", None)
        if num_steps is None and self.scheduler is not None:
            timesteps = getattr(self.scheduler, "timesteps", None)
            if timesteps is not None and len(timesteps) > 0:
                num_steps = len(timesteps)
        self.engine.begin_call(grid, text_len, timestep, step_index=step_index, num_steps=num_steps)
        device = bound["hidden_states"].device
        self._timer = self.engine.timer_start(device)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        if self._timer is not None:
            self.engine.timer_stop(self._timer)
            self._timer = None
        self.engine.end_call()
        return output

    def reset_state(self, module):
        self.engine.reset_generation()
        return module


def register_hook(transformer, engine, family, scheduler=None) -> SparseAttentionHook:
    """Register a fresh :class:`SparseAttentionHook` on ``transformer`` (replacing an earlier one)."""
    remove_hook(transformer)
    hook = SparseAttentionHook(engine, family, scheduler)
    hook.created_registry = "_diffusers_hook" not in transformer.__dict__
    hook.had_forward_attr = "forward" in transformer.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, HOOK_NAME)
    registry.invalidate_child_registries_cache()
    return hook


def get_hook(transformer) -> SparseAttentionHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_hook(transformer) -> bool:
    """Remove the dit-sparse hook; returns whether there was one.

    When it was the transformer's only diffusers hook, the hook registry and the instance ``forward``
    it installed go too (the transformer is left as it was before :func:`register_hook`).
    """
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(HOOK_NAME)
    if hook is None:
        return False
    registry.remove_hook(HOOK_NAME, recurse=False)
    if not registry.hooks and hook.created_registry:
        del transformer._diffusers_hook
        if not hook.had_forward_attr:
            transformer.__dict__.pop("forward", None)
    return True
