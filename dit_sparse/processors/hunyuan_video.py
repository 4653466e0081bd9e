"""HunyuanVideo (``HunyuanVideoTransformer3DModel``).

Joint attention over ``[video, text]`` (video first) in the dual-stream blocks
(``transformer_blocks.N.attn``: text through ``add_*_proj``) and the single-stream blocks
(``single_transformer_blocks.N.attn``: one projection for the concatenated sequence). The model passes
a boolean key mask ``[B, 1, 1, video + text]`` that hides padded text tokens; the engine attends the
text keys densely under that mask next to the sparse video keys, so masked keys stay masked. The
token refiner's attention (``context_embedder``) is plain self-attention over text and stays stock.

Under Ulysses context parallelism (``dit_sparse.parallel.enable_ulysses``, which uses
``parallel.HUNYUAN_VIDEO_CP_PLAN``) each call sees this rank's ``[video_r, text_r]`` tokens and its cut of
the key mask; the plan is made for the full sequence (grid and text length from the hook) and
``parallel.ulysses_attend`` reorders the gathered sequence to ``[all video, all text]`` around the engine,
with the gathered text mask, so the result equals the single-process one.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ._base import Family, SparseProcessorMixin, latent_grid

__all__ = ["HunyuanVideoSparseAttnProcessor", "FAMILY"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


class HunyuanVideoSparseAttnProcessor(SparseProcessorMixin, HunyuanVideoAttnProcessor2_0):
    """``HunyuanVideoAttnProcessor2_0`` with the joint-attention core replaced by the dit-sparse engine."""

    family_name = "hunyuan_video"

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
        mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                             and attention_mask.shape[1:3] == (1, 1))
        if encoder_hidden_states is not None and mask_ok:
            head_dim = attn.to_q.out_features // attn.heads
            plan = self._plan(attn, head_dim, hidden_states.shape[1], encoder_hidden_states.shape[1], False)
        if plan is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != n_video + n_text:
            raise ValueError(
                f"HunyuanVideo under context parallelism: the attention mask has {attention_mask.shape[-1]} keys "
                f"but this rank holds {n_video} video + {n_text} text tokens; enable context parallelism with "
                f"dit_sparse.parallel.enable_ulysses (it uses parallel.HUNYUAN_VIDEO_CP_PLAN and cuts the mask "
                f"per rank), not enable_parallelism alone"
            )
        single_stream = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        query, key, value = (_heads(p(x), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            rot = lambda t: apply_rotary_emb(t, image_rotary_emb, sequence_dim=1)  # noqa: E731
            if single_stream:
                query = torch.cat([rot(query[:, :n_video]), query[:, n_video:]], dim=1)
                key = torch.cat([rot(key[:, :n_video]), key[:, n_video:]], dim=1)
            else:
                query, key = rot(query), rot(key)
        if not single_stream:
            eq, ek, ev = (_heads(p(encoder_hidden_states), attn.heads)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, eq), (key, ek), (value, ev)))

        # padded text keys (under context parallelism: among this rank's text tokens)
        text_valid = None if attention_mask is None else attention_mask[:, 0, 0, n_video:]
        out = self._attend(plan, query, key, value, text_valid=text_valid)
        out = out.flatten(2, 3).to(query.dtype)
        video_out, text_out = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _call_info(module, args: dict):
    cfg = module.config
    grid = latent_grid(args["hidden_states"], (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    return grid, args["encoder_hidden_states"].shape[1], args["timestep"]


def _is_joint(name: str, module) -> bool:
    return name.endswith(".attn") and (name.startswith("transformer_blocks.") or name.startswith("single_transformer_blocks."))


FAMILY = Family(
    name="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    processor_cls=HunyuanVideoSparseAttnProcessor,
    is_self_attention=_is_joint,
    stock_processor=lambda name, module: HunyuanVideoAttnProcessor2_0() if _is_joint(name, module) else AttnProcessor2_0(),
    call_info=_call_info,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
)
