"""Wan (``WanTransformer3DModel``: Wan 2.1, Wan 2.2 A14B and the 5B TI2V config).

Self-attention (``blocks.N.attn1``) runs over the video tokens only; text enters by cross-attention
(``attn2``), which stays stock. The token grid comes from the latent ``[B, C, F, H, W]`` and the config's
``patch_size``; Wan 2.2 TI2V passes per-token timesteps ``[B, S]`` (their maximum orders the steps).
Rotary: Wan rotates interleaved (even, odd) channel pairs with ``freqs_cos[..., 0::2]`` /
``freqs_sin[..., 1::2]``, applied in the processor; :func:`_rotate_pairs` computes the same.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from ._base import Family, SparseProcessorMixin, latent_grid

__all__ = ["WanSparseAttnProcessor", "FAMILY"]


def _rotate_pairs(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class WanSparseAttnProcessor(SparseProcessorMixin, WanAttnProcessor):
    """``WanAttnProcessor`` with the self-attention core replaced by the dit-sparse engine."""

    family_name = "wan"

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        plan = None
        if encoder_hidden_states is None and attention_mask is None and attn.add_k_proj is None:
            plan = self._plan(attn, attn.inner_dim // attn.heads, hidden_states.shape[1], 0, False)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate_pairs(query, *rotary_emb)
            key = _rotate_pairs(key, *rotary_emb)

        out = self._attend(plan, query, key, value).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _call_info(module, args: dict):
    x = args["hidden_states"]
    return latent_grid(x, tuple(module.config.patch_size)), 0, args["timestep"]


FAMILY = Family(
    name="wan",
    transformer_classes=("WanTransformer3DModel",),
    processor_cls=WanSparseAttnProcessor,
    is_self_attention=lambda name, module: name.endswith(".attn1"),
    stock_processor=lambda name, module: WanAttnProcessor(),
    call_info=_call_info,
    block_lists=("blocks",),
)
