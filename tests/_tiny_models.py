"""Tiny random-config transformers of the six supported families, with matching forward inputs.

Every model has head_dim 64 (so the sparse kernels are used), two heads, one or two layers and a
sequence of a few hundred tokens; built offline from diffusers classes with a fixed seed. Each builder
returns a :class:`TinyCase`: the model (fp32, eval mode), a function making the forward's keyword
arguments for a timestep, and the token grid the hook should find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

HEADS, HEAD_DIM = 2, 64


@dataclass
class TinyCase:
    name: str
    model: torch.nn.Module
    make_inputs: Callable[[float], dict]
    grid: tuple[int, int, int]
    text_len: int

    def run(self, timestep: float = 500.0) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(**self.make_inputs(timestep), return_dict=False)[0]
        return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def tiny_wan() -> TinyCase:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()
    latent, text = _rand(1, 4, 4, 16, 16, seed=1), _rand(1, 8, 32, seed=2)

    def inputs(t):
        return {"hidden_states": latent, "timestep": torch.tensor([t]), "encoder_hidden_states": text}

    return TinyCase("wan", model, inputs, (4, 8, 8), 0)


def tiny_cogvideox() -> TinyCase:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    ).eval()
    latent, text = _rand(1, 3, 4, 16, 16, seed=1), _rand(1, 16, 32, seed=2)
    n_video = 3 * 8 * 8
    # Random rotary tables: the model passes them through to the processors unchanged.
    rotary = (_rand(n_video, HEAD_DIM, seed=3), _rand(n_video, HEAD_DIM, seed=4))

    def inputs(t):
        return {"hidden_states": latent, "encoder_hidden_states": text, "timestep": torch.tensor([t]),
                "image_rotary_emb": rotary}

    return TinyCase("cogvideox", model, inputs, (3, 8, 8), 16)


def tiny_hunyuan_video() -> TinyCase:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=1.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24),
    ).eval()
    latent, text, pooled = _rand(1, 4, 3, 16, 16, seed=1), _rand(1, 12, 32, seed=2), _rand(1, 16, seed=3)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 7:] = False  # padded prompt: the last 5 text tokens are masked

    def inputs(t):
        return {"hidden_states": latent, "timestep": torch.tensor([t]), "encoder_hidden_states": text,
                "encoder_attention_mask": mask, "pooled_projections": pooled, "guidance": torch.tensor([3.5])}

    return TinyCase("hunyuan_video", model, inputs, (3, 8, 8), 12)


def tiny_ltx() -> TinyCase:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM, cross_attention_dim=HEADS * HEAD_DIM, num_layers=1, caption_channels=32,
    ).eval()
    latent, text = _rand(1, 2 * 8 * 16, 8, seed=1), _rand(1, 8, 32, seed=2)
    mask = torch.ones(1, 8)

    def inputs(t):
        return {"hidden_states": latent, "encoder_hidden_states": text, "timestep": torch.tensor([t]),
                "encoder_attention_mask": mask, "num_frames": 2, "height": 8, "width": 16}

    return TinyCase("ltx", model, inputs, (2, 8, 16), 0)


def tiny_mochi() -> TinyCase:
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
        pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=4, max_sequence_length=16,
    ).eval()
    latent, text = _rand(1, 4, 3, 16, 16, seed=1), _rand(1, 16, 32, seed=2)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[:, 10:] = False

    def inputs(t):
        return {"hidden_states": latent, "encoder_hidden_states": text, "timestep": torch.tensor([t]),
                "encoder_attention_mask": mask}

    return TinyCase("mochi", model, inputs, (3, 8, 8), 16)


def tiny_flux() -> TinyCase:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(16, 24, 24),
    ).eval()
    h, w = 12, 20
    latent, text, pooled = _rand(1, h * w, 16, seed=1), _rand(1, 12, 32, seed=2), _rand(1, 16, seed=3)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_ids = torch.zeros(12, 3)

    def inputs(t):
        return {"hidden_states": latent, "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": torch.tensor([t / 1000.0]), "img_ids": img_ids, "txt_ids": txt_ids}

    return TinyCase("flux", model, inputs, (1, h, w), 12)


BUILDERS = {
    "wan": tiny_wan,
    "cogvideox": tiny_cogvideox,
    "hunyuan_video": tiny_hunyuan_video,
    "ltx": tiny_ltx,
    "mochi": tiny_mochi,
    "flux": tiny_flux,
}
