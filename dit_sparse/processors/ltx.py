"""LTX-Video (``LTXVideoTransformer3DModel``).

Self-attention (``transformer_blocks.N.attn1``) over video tokens only; text enters by cross-attention
(``attn2``, stock). The transformer takes packed tokens ``[B, S, C]`` plus ``num_frames``, ``height``,
``width`` of the latent token grid (divided by the config's patch sizes when they count latent
pixels rather than tokens). q and k are normalised
over all heads and rotated with the model's own ``apply_rotary_emb`` before being split into heads.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from ._base import Family, SparseProcessorMixin

__all__ = ["LTXSparseAttnProcessor", "FAMILY"]


class LTXSparseAttnProcessor(SparseProcessorMixin, LTXVideoAttnProcessor):
    """``LTXVideoAttnProcessor`` with the self-attention core replaced by the dit-sparse engine."""

    family_name = "ltx"

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = None
        if encoder_hidden_states is None and attention_mask is None and attn.inner_kv_dim == attn.inner_dim:
            plan = self._plan(attn, attn.head_dim, hidden_states.shape[1], 0, False)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        out = self._attend(plan, query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _call_info(module, args: dict):
    cfg = module.config
    f, h, w = args.get("num_frames"), args.get("height"), args.get("width")
    if f is None or h is None or w is None:
        raise ValueError(
            "LTX-Video: dit-sparse needs num_frames, height and width in the transformer call (the latent "
            "grid); calls with only video_coords are not supported"
        )
    grid = (int(f), int(h), int(w))
    if grid[0] * grid[1] * grid[2] != args["hidden_states"].shape[1]:
        # the dims were given before patchify
        grid = (grid[0] // cfg.patch_size_t, grid[1] // cfg.patch_size, grid[2] // cfg.patch_size)
    return grid, 0, args["timestep"]


FAMILY = Family(
    name="ltx",
    transformer_classes=("LTXVideoTransformer3DModel",),
    processor_cls=LTXSparseAttnProcessor,
    is_self_attention=lambda name, module: name.endswith(".attn1"),
    stock_processor=lambda name, module: LTXVideoAttnProcessor(),
    call_info=_call_info,
    block_lists=("transformer_blocks",),
)
