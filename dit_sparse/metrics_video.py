"""Video quality metrics: PSNR and SSIM between two videos, in plain PyTorch.

Used by ``dit-sparse compare`` and ``scripts/quality_report.py`` to measure how far a sparse-attention
video drifts from the dense video generated from the same seed.

Videos are ``[F, H, W, C]`` (frames, height, width, channels) as numpy arrays or torch tensors, either
``uint8`` in ``[0, 255]`` or floating point in ``[0, 1]``; a single image ``[H, W, C]`` is accepted as a
one-frame video. Both videos must have the same shape; they may differ in dtype (a ``uint8`` video is
rescaled to ``[0, 1]`` before comparison), so a video and its float export compare as equal.

SSIM follows Wang et al. 2004 (https://ece.uwaterloo.ca/~z70wang/publications/ssim.pdf): an 11x11
Gaussian window with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, computed per frame and channel over the
window positions that lie fully inside the frame, then averaged. Frames smaller than the window use
the largest odd window that fits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "gaussian_window"]

_FRAMES_PER_CHUNK = 8  # bounds SSIM's working memory to a few frames of float64 maps


def _as_video(x, name: str) -> torch.Tensor:
    """Return ``x`` as a float64 ``[F, H, W, C]`` tensor in ``[0, 1]``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor [F, H, W, C], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a video [F, H, W, C] or an image [H, W, C], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass a video with at least one pixel")
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; pass uint8 in [0, 255] or floating point in [0, 1]")
    return x.to(torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_video(a, "a"), _as_video(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; compare videos generated with the "
            "same frames, height and width"
        )
    return a, b


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two videos ``[F, H, W, C]`` (peak value 1.0 after scaling).

    The mean squared error is taken over every pixel of every frame, so ``psnr = 10 * log10(1 / mse)``
    with ``uint8`` inputs scaled to ``[0, 1]``. Identical videos give ``inf``.
    """
    a, b = _pair(a, b)
    mse = torch.mean((a - b) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalized 2D Gaussian window, float64 ``[size, size]`` summing to 1."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, window_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity between two videos ``[F, H, W, C]`` (1.0 for identical videos).

    Computed per frame and channel with a Gaussian window (``window_size`` x ``window_size``,
    ``sigma``) over the positions where the window lies inside the frame, then averaged over positions,
    channels and frames. Values lie in ``[-1, 1]``.
    """
    a, b = _pair(a, b)
    f, h, w, c = a.shape
    size = min(window_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"frames of {h}x{w} pixels are too small for SSIM; use frames of at least 1x1")
    win = gaussian_window(size, sigma).view(1, 1, size, size)
    c1, c2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1
    total, count = 0.0, 0
    for start in range(0, f, _FRAMES_PER_CHUNK):
        # [F, H, W, C] -> [F*C, 1, H, W]: every channel of every frame is one image.
        x = a[start : start + _FRAMES_PER_CHUNK].permute(0, 3, 1, 2).reshape(-1, 1, h, w)
        y = b[start : start + _FRAMES_PER_CHUNK].permute(0, 3, 1, 2).reshape(-1, 1, h, w)
        mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
        var_x = F.conv2d(x * x, win) - mu_x**2
        var_y = F.conv2d(y * y, win) - mu_y**2
        cov = F.conv2d(x * y, win) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        smap = num / den
        total += smap.sum().item()
        count += smap.numel()
    return total / count
