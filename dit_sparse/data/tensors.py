"""Conversions between the video layout the data sets return and the layout diffusers models take.

Data sets return videos as ``[F, H, W, 3]`` (one video) or ``[N, F, H, W, 3]`` (a batch), uint8 in
``[0, 255]`` or float in ``[0, 1]``. Diffusers video VAEs take float ``[N, 3, F, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import torch

__all__ = ["model_input_to_video", "video_to_model_input"]


def video_to_model_input(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[F, H, W, 3]`` or ``[N, F, H, W, 3]`` (uint8 0..255 or float 0..1) -> float ``[N, 3, F, H, W]`` in [-1, 1]."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() == 4:
        video = video.unsqueeze(0)
    if video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be [F, H, W, 3] or [N, F, H, W, 3], got shape {tuple(video.shape)}")
    x = video.to(dtype) / 255.0 if video.dtype == torch.uint8 else video.to(dtype)
    return (x * 2 - 1).permute(0, 4, 1, 2, 3).contiguous()


def model_input_to_video(x: torch.Tensor) -> torch.Tensor:
    """float ``[N, 3, F, H, W]`` in [-1, 1] -> uint8 ``[N, F, H, W, 3]`` (values outside [-1, 1] are clipped)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a float tensor [N, 3, F, H, W], got {shape}")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()
