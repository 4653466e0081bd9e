"""Flow-matching training objective of Wan (rectified flow with a shifted sigma distribution).

A clean latent ``x0`` and Gaussian ``noise`` are mixed at noise level ``sigma`` in ``[0, 1]``:
``x_t = (1 - sigma) * x0 + sigma * noise``; the transformer, given ``x_t`` and the timestep
``sigma * num_train_timesteps``, predicts the velocity ``v = noise - x0`` and is trained with MSE.
Sigmas are drawn uniformly and then shifted exactly as the scheduler shifts its sampling sigmas
(``shift * s / (1 + (shift - 1) * s)``), so training sees the noise levels that inference visits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "scheduler_shift",
    "shift_sigmas",
    "sample_sigmas",
    "eval_sigmas",
    "noisy_input",
    "flow_matching_loss",
]


def scheduler_shift(scheduler) -> float:
    """The sigma shift of a diffusers flow-matching scheduler (``shift`` or UniPC's ``flow_shift``), else 1."""
    config = getattr(scheduler, "config", {}) or {}
    for key in ("shift", "flow_shift"):
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if value is not None:
            return float(value)
    return 1.0


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform ``u`` in ``[0, 1]`` to shifted sigmas ``shift * u / (1 + (shift - 1) * u)`` (same shape)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}; Wan uses 3.0 (480p) or 5.0 (720p)")
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(batch: int, shift: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Random training sigmas, float32 ``[batch]``, drawn from ``generator`` (kept on CPU for resumability)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float32)
    return shift_sigmas(u, shift).to(device)


def eval_sigmas(n: int, shift: float, device="cpu") -> torch.Tensor:
    """``n`` fixed sigmas, float32 ``[n]``, at mid-quantiles of the shifted distribution (a steady eval loss)."""
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return shift_sigmas(u, shift).to(device)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, target)`` for latents ``x0`` / ``noise`` ``[B, C, F, H, W]`` and ``sigmas`` ``[B]``."""
    if x0.shape != noise.shape:
        raise ValueError(f"latents {tuple(x0.shape)} and noise {tuple(noise.shape)} must have one shape")
    if sigmas.shape != (x0.shape[0],):
        raise ValueError(f"sigmas must be [batch={x0.shape[0]}], got {tuple(sigmas.shape)}")
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    num_train_timesteps: int = 1000,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean squared error between the transformer's velocity and ``noise - latents`` (a float32 scalar).

    Args:
        transformer: a diffusers video transformer called as ``transformer(x_t, timestep, prompt_embeds)``.
        latents: normalised clean latents ``[B, C, F, H, W]``.
        prompt_embeds: text-encoder states ``[B, L, text_dim]``.
        noise: Gaussian noise, same shape as ``latents``.
        sigmas: noise levels ``[B]`` in ``[0, 1]``.
        num_train_timesteps: the scheduler's timestep scale (timestep = sigma * this).
        autocast_dtype: run the transformer under ``torch.autocast`` with this dtype (CUDA bf16), or None.
    """
    x_t, target = noisy_input(latents, noise, sigmas)
    param = next(transformer.parameters())
    timestep = (sigmas * num_train_timesteps).to(latents.device)
    with torch.autocast(latents.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = transformer(
            hidden_states=x_t.to(param.dtype),
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(param.dtype),
            return_dict=False,
        )[0]
    return F.mse_loss(pred.float(), target.float())
