"""CogVideoX (``CogVideoXTransformer3DModel``: 2B, 5B, 1.5 with temporal patches).

One joint attention per block (``transformer_blocks.N.attn1``) over ``[text (226 tokens), video]``:
text first. The latent is ``[B, F, C, H, W]`` (frames before channels) patchified by ``patch_size`` and,
for CogVideoX 1.5, ``patch_size_t``. Rotary (5B and later) is applied to the video part of q and k
with diffusers' ``apply_rotary_emb``, as the stock processor does.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ._base import Family, SparseProcessorMixin, latent_grid

__all__ = ["CogVideoXSparseAttnProcessor", "FAMILY"]


class CogVideoXSparseAttnProcessor(SparseProcessorMixin, CogVideoXAttnProcessor2_0):
    """``CogVideoXAttnProcessor2_0`` with the joint-attention core replaced by the dit-sparse engine."""

    family_name = "cogvideox"

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = None
        if attention_mask is None and not attn.is_cross_attention:
            head_dim = attn.to_k.out_features // attn.heads
            text_len = encoder_hidden_states.size(1)
            plan = self._plan(attn, head_dim, hidden_states.shape[1], text_len, True)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = x.shape[0]
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :text_len], apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)], 2)
            key = torch.cat([key[:, :, :text_len], apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)], 2)

        out = self.engine.attend(plan, query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, encoder_out


def _call_info(module, args: dict):
    cfg = module.config
    patch = (cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size)
    grid = latent_grid(args["hidden_states"], patch, frames_dim=1)
    return grid, args["encoder_hidden_states"].shape[1], args["timestep"]


FAMILY = Family(
    name="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    processor_cls=CogVideoXSparseAttnProcessor,
    is_self_attention=lambda name, module: name.endswith(".attn1"),
    stock_processor=lambda name, module: CogVideoXAttnProcessor2_0(),
    call_info=_call_info,
    block_lists=("transformer_blocks",),
)
