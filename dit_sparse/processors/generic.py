"""`SparseAttnProcessor`: one processor instance for every attention module of a transformer.

The plain diffusers way::

    transformer.set_attn_processor(SparseAttnProcessor(config))

puts the same instance on every attention module. Per module it dispatches to the model family's
sparse processor (self / joint attention) or to a stock processor (cross-attention, the HunyuanVideo
token refiner, skipped layers), all sharing one engine. It needs the transformer's hook for the token
grid and the step: ``apply_sparse_attention`` installs it up front; set this way, the first call finds
its transformer on the call stack, installs the hook and computes that forward exactly as stock
(dense); later forwards are sparse. Its ``__call__`` declares the union of the families' arguments
(diffusers drops keyword arguments a processor does not declare).
"""

from __future__ import annotations

import sys

import torch

from ..config import SparseAttentionConfig

__all__ = ["SparseAttnProcessor"]

_STACK_DEPTH = 40


class SparseAttnProcessor:
    """Sparse attention for all attention modules of a supported transformer (see the module docstring).

    Args:
        config: :class:`SparseAttentionConfig`; ``None`` = the default config. It is copied.
    """

    # Set by diffusers' enable_parallelism; passed on to the per-module processors at each call.
    _parallel_config = None

    def __init__(self, config: SparseAttentionConfig | None = None):
        from ..engine import SparseAttentionEngine

        if config is None:
            config = SparseAttentionConfig()
        if not isinstance(config, SparseAttentionConfig):
            raise ValueError(f"config must be a SparseAttentionConfig or None, got {type(config).__name__}")
        self.config = config.copy()
        self.engine = SparseAttentionEngine(self.config)
        self._handlers: dict[int, object] = {}

    def set_handlers(self, handlers: dict[int, object]) -> None:
        """Per attention module (by ``id``), the processor that computes it (set by ``apply``)."""
        self._handlers = dict(handlers)

    def handler_for(self, attn):
        return self._handlers.get(id(attn))

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        rotary_emb=None,
    ):
        handler = self._handlers.get(id(attn))
        if handler is None:
            self._attach_from_stack(attn)
            handler = self._handlers.get(id(attn))
            if handler is None:
                raise ValueError(
                    f"SparseAttnProcessor got a call from a {type(attn).__name__} it cannot place in a supported "
                    f"transformer; use apply_sparse_attention(transformer, config) instead of set_attn_processor"
                )
        if self._parallel_config is not None and hasattr(handler, "_parallel_config"):
            handler._parallel_config = self._parallel_config
        rotary = rotary_emb if rotary_emb is not None else image_rotary_emb
        return handler(attn, hidden_states, encoder_hidden_states, attention_mask, rotary)

    def _attach_from_stack(self, attn) -> None:
        """Find the transformer running this call on the Python stack and attach this processor to it."""
        from ..apply import attach_processor
        from .registry import family_of

        frame = sys._getframe(1)
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return
            for name in ("self", "module"):
                obj = frame.f_locals.get(name)
                if isinstance(obj, torch.nn.Module) and family_of(obj) is not None:
                    if any(m is attn for m in obj.modules()):
                        attach_processor(obj, self)
                        return
            frame = frame.f_back
