"""Flux (``FluxTransformer2DModel``): an MM-DiT for images, a token grid of one frame.

Joint attention over ``[text, image]`` (text first) in the dual-stream blocks
(``transformer_blocks.N.attn``: text through ``add_*_proj``) and the single-stream blocks
(``single_transformer_blocks.N.attn``: the block passes the concatenated sequence, the text length comes
from the transformer call). The image grid comes from ``img_ids`` (rows in column 1, columns in
column 2); sequences that hold more than one image grid (reference-image tokens) stay stock.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from ._base import Family, SparseProcessorMixin

__all__ = ["FluxSparseAttnProcessor", "FAMILY"]


class FluxSparseAttnProcessor(SparseProcessorMixin, FluxAttnProcessor):
    """``FluxAttnProcessor`` with the joint-attention core replaced by the dit-sparse engine."""

    family_name = "flux"

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = None
        engine = self.engine
        call = None if engine is None else engine.active_call
        if attention_mask is None and call is not None:
            if encoder_hidden_states is None:
                text_len = call.text_len
                plan = self._plan(attn, attn.head_dim, hidden_states.shape[1] - text_len, text_len, True)
            elif attn.added_kv_proj_dim is not None:
                plan = self._plan(attn, attn.head_dim, hidden_states.shape[1], encoder_hidden_states.shape[1], True)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((eq, query), (ek, key), (ev, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = engine.attend(plan, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


def _call_info(module, args: dict):
    ids = args["img_ids"]
    if ids.ndim == 3:
        ids = ids[0]
    rows_cols = ids[:, 1:3].amax(0) - ids[:, 1:3].amin(0) + 1
    height, width = (int(v) for v in rows_cols.tolist())
    return (1, height, width), args["encoder_hidden_states"].shape[1], args["timestep"]


def _is_joint(name: str, module) -> bool:
    return name.endswith(".attn") and (name.startswith("transformer_blocks.") or name.startswith("single_transformer_blocks."))


FAMILY = Family(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    processor_cls=FluxSparseAttnProcessor,
    is_self_attention=_is_joint,
    stock_processor=lambda name, module: FluxAttnProcessor(),
    call_info=_call_info,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
)
