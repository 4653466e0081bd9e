"""Turn training samples into transformer inputs with the pipeline's own frozen VAE and text encoder.

Videos ``[B, 3, F, H, W]`` in ``[-1, 1]`` become latents normalised exactly as the Wan pipeline expects
them (``(z - latents_mean) / latents_std`` with the statistics from the VAE config; the pipeline undoes
this before decoding), using the posterior mode so a sample always encodes to the same latent. Prompts
become the text encoder's states padded to ``max_sequence_length``, as ``pipe.encode_prompt`` makes them
at generation time.
"""

from __future__ import annotations

import torch

__all__ = ["latent_stats", "encode_videos", "encode_prompts", "check_video_shape"]


def latent_stats(vae, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE latents, each ``[1, z_dim, 1, 1, 1]`` (zeros / ones if the config has none)."""
    cfg = vae.config
    z_dim = getattr(cfg, "z_dim", None) or getattr(cfg, "latent_channels", None)
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        if z_dim is None:
            raise ValueError(f"{type(vae).__name__} config has neither latents_mean/std nor z_dim")
        shape = (1, z_dim, 1, 1, 1)
        return torch.zeros(shape, device=device, dtype=dtype), torch.ones(shape, device=device, dtype=dtype)
    mean = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


def check_video_shape(pipe, num_frames: int, height: int, width: int) -> None:
    """Raise ``ValueError`` naming the nearest valid size if the pipeline cannot take this video size."""
    from ..pipelines.registry import valid_video_size

    asked = (num_frames, height, width)
    nearest = tuple(valid_video_size(pipe, *asked))
    if nearest != asked:
        raise ValueError(
            f"the model cannot take {asked[0]} frames at {asked[1]}x{asked[2]}; nearest valid size: "
            f"{nearest[0]} frames at {nearest[1]}x{nearest[2]}"
        )


@torch.no_grad()
def encode_videos(vae, videos: torch.Tensor) -> torch.Tensor:
    """Normalised latents float32 ``[B, z_dim, F', H', W']`` of ``videos`` ``[B, 3, F, H, W]`` in ``[-1, 1]``."""
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [B, 3, F, H, W] in [-1, 1], got shape {tuple(videos.shape)}")
    param = next(vae.parameters())
    posterior = vae.encode(videos.to(param.device, param.dtype)).latent_dist
    z = posterior.mode().float()
    mean, std = latent_stats(vae, z.device)
    return (z - mean) / std


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int, device) -> torch.Tensor:
    """Text-encoder states float32 ``[B, max_sequence_length, text_dim]`` of ``prompts`` (no CFG)."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=device,
        dtype=torch.float32,
    )
    return embeds
