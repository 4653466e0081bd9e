"""What every model family's sparse processor shares: the :class:`Family` description the hook and
``apply`` read, and :class:`SparseProcessorMixin`, the engine binding of a processor.

A family processor subclasses the model's own diffusers processor. Its constructor takes no arguments
(diffusers rebuilds processors with ``proc.__class__()``); :meth:`SparseProcessorMixin.bind` attaches
the shared :class:`~dit_sparse.engine.SparseAttentionEngine` afterwards. An unbound processor, a call the
engine does not plan (cross-attention, tiny head dims, short sequences, dense steps), or an input it
does not recognise goes to ``super().__call__``: exactly the stock computation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Family", "SparseProcessorMixin", "bind_forward_args"]


@dataclass(frozen=True)
class Family:
    """One supported model family.

    * ``name``: short name (``"wan"``, ``"flux"``, ...)
    * ``transformer_classes``: diffusers transformer class names of this family
    * ``processor_cls``: our sparse processor class (subclass of the stock one)
    * ``is_self_attention(name, module)``: the attention modules whose self/joint attention we replace
    * ``stock_processor(name, module)``: a fresh stock processor for a module (for the one-instance
      :class:`~dit_sparse.processors.SparseAttnProcessor`, which replaces every processor)
    * ``call_info(module, args)``: from the transformer's bound forward arguments, the token grid
      ``(frames, height, width)`` after patchify, the number of text tokens inside joint attention and
      the timestep
    * ``block_lists``: names of the transformer's ``ModuleList`` attributes holding its transformer
      blocks, in the order the forward runs them (block-level step caching hooks these blocks)
    """

    name: str
    transformer_classes: tuple[str, ...]
    processor_cls: type
    is_self_attention: Callable[[str, Any], bool]
    stock_processor: Callable[[str, Any], Any]
    call_info: Callable[[Any, dict], tuple[tuple[int, int, int], int, Any]]
    block_lists: tuple[str, ...] = ("transformer_blocks",)


class SparseProcessorMixin:
    """Engine binding shared by the family processors (put it first in the bases).

    Under diffusers' context parallelism (``_parallel_config``, set by ``enable_parallelism``) the
    processor sees this rank's sequence shard: :meth:`_plan` plans for the full sequence and
    :meth:`_attend` runs the engine inside diffusers' Ulysses attention (``dit_sparse/parallel.py``).
    Families that cannot do that exactly (``family_name`` not in ``parallel.ULYSSES_FAMILIES``) and ring
    attention raise ``ValueError`` at the first call instead.
    """

    engine = None
    family_name: str = ""

    def bind(self, engine) -> "SparseProcessorMixin":
        """Attach the shared engine; returns ``self``."""
        self.engine = engine
        return self

    def _plan(self, attn, head_dim: int, video_len: int, text_len: int, text_first: bool):
        engine = self.engine
        if engine is None:
            return None
        from .. import parallel

        cp = parallel.context_parallel_config(self)
        if cp is not None:
            parallel.check_supported(self.family_name, engine.config)
            call = engine.active_call
            if call is not None:  # this rank's shard -> the full sequence the plan is made for
                f, h, w = call.grid
                if text_len == 0:
                    full = parallel.full_sequence_length(video_len, f * h * w, cp)
                else:  # joint attention (HunyuanVideo): shards of the video and of the text tokens
                    full = parallel.full_joint_lengths(video_len, text_len, f * h * w, call.text_len, cp)
                if full is None:
                    return engine._passthrough("parallel_shard")
                video_len, text_len = (full, 0) if text_len == 0 else full
        return engine.plan(attn, head_dim, video_len, text_len, text_first)

    def _attend(self, plan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        """``engine.attend`` for q, k, v ``[B, S, H, D]`` (diffusers' layout); returns ``[B, S, H, D]``.
        Under context parallelism S is this rank's shard and the engine runs per head shard."""
        parallel_config = getattr(self, "_parallel_config", None)
        if getattr(parallel_config, "context_parallel_config", None) is not None:
            from ..parallel import ulysses_attend

            return ulysses_attend(self.engine, plan, query, key, value, parallel_config, **kwargs)
        out = self.engine.attend(plan, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **kwargs)
        return out.transpose(1, 2)


_SIGNATURES: dict[type, inspect.Signature] = {}


def bind_forward_args(module, args: tuple, kwargs: dict) -> dict:
    """The transformer forward's arguments by name (positional ones included)."""
    cls = type(module)
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    bound = sig.bind_partial(module, *args, **kwargs)
    return dict(bound.arguments)


def latent_grid(hidden_states: torch.Tensor, patch: tuple[int, int, int], frames_dim: int = 2) -> tuple[int, int, int]:
    """Token grid of a ``[B, C, F, H, W]`` (``frames_dim=2``) or ``[B, F, C, H, W]`` (``frames_dim=1``)
    latent patchified by ``patch = (p_t, p_h, p_w)``."""
    if hidden_states.dim() != 5:
        raise ValueError(f"expected a 5D video latent, got shape {tuple(hidden_states.shape)}")
    f = hidden_states.shape[frames_dim]
    h, w = hidden_states.shape[-2], hidden_states.shape[-1]
    pt, ph, pw = patch
    return (f // pt, h // ph, w // pw)
