"""Mochi (``MochiTransformer3DModel``).

Joint attention over ``[video, text]`` in ``transformer_blocks.N.attn1`` (``MochiAttention``, which has
no ``set_processor``: ``apply`` sets ``.processor``). The stock processor drops padded text tokens
(``encoder_attention_mask``) from queries and keys and returns zeros for them; here the text keys are
attended densely under the mask next to the sparse video keys, and padded text rows are zeroed. (The
stock processor packs the valid text outputs first; with the usual right-padded prompts that is the
same order.) Rotary on the video q/k rotates interleaved channel pairs, see :func:`_rotate_pairs`.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ._base import Family, SparseProcessorMixin, latent_grid

__all__ = ["MochiSparseAttnProcessor", "FAMILY"]


def _rotate_pairs(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    first = (even * freqs_cos - odd * freqs_sin).to(x.dtype)
    second = (even * freqs_sin + odd * freqs_cos).to(x.dtype)
    return torch.stack([first, second], dim=-1).flatten(-2)


class MochiSparseAttnProcessor(SparseProcessorMixin, MochiAttnProcessor2_0):
    """``MochiAttnProcessor2_0`` with the joint-attention core replaced by the dit-sparse engine."""

    family_name = "mochi"

    @torch.compiler.disable
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = None
        if attention_mask is not None and attention_mask.dim() == 2:
            head_dim = attn.to_q.out_features // attn.heads
            plan = self._plan(attn, head_dim, hidden_states.shape[1], encoder_hidden_states.shape[1], False)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        n_video = hidden_states.shape[1]
        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq, ek, ev = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        if image_rotary_emb is not None:
            query = _rotate_pairs(query, *image_rotary_emb)
            key = _rotate_pairs(key, *image_rotary_emb)
        query, key, value = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((query, eq), (key, ek), (value, ev)))

        valid = attention_mask.bool()
        out = self.engine.attend(plan, query, key, value, text_valid=valid)
        keep_rows = torch.cat([valid.new_ones(valid.shape[0], n_video), valid], dim=1)
        out = out * keep_rows[:, None, :, None].to(out.dtype)
        out = out.transpose(1, 2).flatten(2, 3)
        video_out, text_out = out.split_with_sizes((n_video, out.shape[1] - n_video), dim=1)
        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _call_info(module, args: dict):
    p = module.config.patch_size
    grid = latent_grid(args["hidden_states"], (1, p, p))
    return grid, args["encoder_hidden_states"].shape[1], args["timestep"]


FAMILY = Family(
    name="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    processor_cls=MochiSparseAttnProcessor,
    is_self_attention=lambda name, module: name.endswith(".attn1"),
    stock_processor=lambda name, module: MochiAttnProcessor2_0(),
    call_info=_call_info,
    block_lists=("transformer_blocks",),
)
