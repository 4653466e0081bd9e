"""A seeded procedural text-to-video set: one coloured shape that moves, bounces, grows, shrinks or
changes colour over a plain or textured background, with a prompt that says so.

Sample ``i`` of seed ``s`` is the same on every machine: its :class:`VideoSpec` comes from
``numpy.random.default_rng([s, i])`` and rendering is a pure function of the spec. Rendering is
vectorised in torch, so a training loop renders whole batches on the GPU (:func:`render_videos`);
:class:`ProceduralVideoDataset` serves single samples for a ``DataLoader``.

Layouts: :func:`render_videos` returns float ``[N, F, H, W, 3]`` in [0, 1]; the data set returns uint8
``[F, H, W, 3]``; :func:`dit_sparse.data.video_to_model_input` turns either into the
``[N, 3, F, H, W]`` in [-1, 1] that diffusers VAEs take. Geometry is resolution-free (positions are
fractions of the frame, sizes fractions of ``min(H, W)``), so a spec renders the same scene at any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .vocabulary import COLORS, DIRECTIONS, SHAPES, TEXTURES, PromptAttributes, compose_prompt

__all__ = ["HELD_OUT_SPEC_SEED", "ProceduralVideoDataset", "VideoSpec", "held_out_specs", "render_videos", "sample_spec"]

# Seed of the held-out prompts that prompt following is measured on (scripts/prompt_following.py, and the
# training script after each run); the default model trains on seeds 0-4 (and 1002+ on more GPUs).
HELD_OUT_SPEC_SEED = 777

_MOTION_KINDS = tuple(f"moving {d}" for d in DIRECTIONS) + ("bouncing", "growing", "shrinking", "turning")


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one procedural video.

    ``attrs`` is what the prompt says; the rest is what it leaves open: ``size`` (shape radius as a
    fraction of ``min(H, W)``; the start size for growing / shrinking), ``x0`` / ``y0`` (start centre as
    fractions of width / height), ``travel`` (distance moved, or bounce height), ``bounces`` (number of
    bounces), ``growth`` (end / start size for growing, its inverse for shrinking) and
    ``texture_period`` (background pattern period as a fraction of ``min(H, W)``).
    """

    attrs: PromptAttributes
    size: float
    x0: float
    y0: float
    travel: float = 0.0
    bounces: float = 0.0
    growth: float = 1.0
    texture_period: float = 0.125

    @property
    def prompt(self) -> str:
        return compose_prompt(self.attrs)


def sample_spec(seed: int, index: int) -> VideoSpec:
    """The spec of sample ``index`` of the set with ``seed`` (both non-negative ints); deterministic."""
    if not (isinstance(seed, (int, np.integer)) and isinstance(index, (int, np.integer))) or seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative ints, got seed={seed!r}, index={index!r}")
    rng = np.random.default_rng([int(seed), int(index)])

    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    colors = tuple(COLORS)
    color, shape, motion = pick(colors), pick(SHAPES), pick(_MOTION_KINDS)
    target = pick([c for c in colors if c != color]) if motion == "turning" else None
    background = pick([c for c in colors if c not in (color, target)])
    texture = pick(TEXTURES) if rng.random() < 0.5 else None
    attrs = PromptAttributes(color, shape, motion, background, texture, target)

    size = float(rng.uniform(0.09, 0.14))
    x0, y0 = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))
    travel = bounces = 0.0
    growth = 1.0
    if motion in ("moving left", "moving right"):
        travel = float(rng.uniform(0.4, 0.55))
        x0 = float(rng.uniform(0.68, 0.8)) if motion == "moving left" else float(rng.uniform(0.2, 0.32))
    elif motion in ("moving up", "moving down"):
        travel = float(rng.uniform(0.4, 0.55))
        y0 = float(rng.uniform(0.68, 0.8)) if motion == "moving up" else float(rng.uniform(0.2, 0.32))
    elif motion == "bouncing":
        y0 = float(rng.uniform(0.72, 0.8))  # the floor
        travel = float(rng.uniform(0.35, 0.5))
        bounces = float(rng.uniform(1.5, 2.5))
    elif motion in ("growing", "shrinking"):
        size = float(rng.uniform(0.05, 0.07))
        growth = float(rng.uniform(2.2, 3.0))
        x0, y0 = float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))
    period = float(rng.uniform(0.1, 0.16))
    return VideoSpec(attrs, size, x0, y0, travel, bounces, growth, period)


def held_out_specs(n: int, spec_seed: int = HELD_OUT_SPEC_SEED) -> list:
    """The ``n`` held-out specs: ``sample_spec(spec_seed, i)`` for i < n."""
    return [sample_spec(spec_seed, i) for i in range(n)]


def _trajectory(spec: VideoSpec, t: np.ndarray):
    """Per frame (``t`` in [0, 1], shape [F]): centre x, y (fractions), radius, and colour [F, 3]."""
    motion = spec.attrs.motion
    cx = np.full_like(t, spec.x0)
    cy = np.full_like(t, spec.y0)
    r = np.full_like(t, spec.size)
    if motion == "moving left":
        cx = spec.x0 - spec.travel * t
    elif motion == "moving right":
        cx = spec.x0 + spec.travel * t
    elif motion == "moving up":
        cy = spec.y0 - spec.travel * t
    elif motion == "moving down":
        cy = spec.y0 + spec.travel * t
    elif motion == "bouncing":
        cy = spec.y0 - spec.travel * np.abs(np.sin(math.pi * spec.bounces * t))
    elif motion == "growing":
        r = spec.size * spec.growth**t
    elif motion == "shrinking":
        r = spec.size * spec.growth ** (1 - t)
    rgb = np.tile(np.asarray(COLORS[spec.attrs.color]), (len(t), 1))
    if motion == "turning":
        w = (t * t * (3 - 2 * t))[:, None]  # smoothstep: the change is gradual at both ends
        rgb = (1 - w) * rgb + w * np.asarray(COLORS[spec.attrs.target_color])
    return cx, cy, r, rgb


# Signed distances (negative inside) in units of min(H, W); sizes chosen so every shape covers about
# the same area as the circle of radius r.
def _sdf_circle(dx, dy, r):
    return torch.sqrt(dx * dx + dy * dy) - r


def _sdf_square(dx, dy, r):
    return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r


def _sdf_diamond(dx, dy, r):
    return (dx.abs() + dy.abs() - 1.2 * r) * (0.5**0.5)


def _sdf_triangle(dx, dy, r):
    # Upright equilateral triangle around its centroid (image y points down), inradius 0.75 r.
    s = 0.5 * 3**0.5
    return torch.maximum(dy, torch.maximum(s * dx - 0.5 * dy, -s * dx - 0.5 * dy)) - 0.75 * r


def _sdf_ring(dx, dy, r):
    return (torch.sqrt(dx * dx + dy * dy) - 0.8 * r).abs() - 0.25 * r


_SDF = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "diamond": _sdf_diamond,
    "triangle": _sdf_triangle,
    "ring": _sdf_ring,
}


def _coverage(sdf: torch.Tensor, pixels: float) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a signed distance in units of ``pixels`` pixels."""
    return (0.5 - sdf * pixels).clamp(0.0, 1.0)


def _texture_mask(texture: str, X: torch.Tensor, Y: torch.Tensor, period: torch.Tensor, m: int) -> torch.Tensor:
    """Where the second background shade shows, in [0, 1]: X [1, 1, 1, W], Y [1, 1, H, 1], period [n, 1, 1, 1]."""

    def stripes(coord):  # 1 on half of every period, anti-aliased
        g = torch.frac(coord / period + 0.25)
        return _coverage(((g - 0.5).abs() - 0.25) * period, m)

    if texture == "striped":
        return stripes(X).expand(-1, -1, Y.shape[2], -1)
    if texture == "checkered":
        a, b = stripes(X), stripes(Y)
        return a + b - 2 * a * b
    if texture == "dotted":
        dx = (torch.frac(X / period) - 0.5) * period
        dy = (torch.frac(Y / period) - 0.5) * period
        return _coverage(torch.sqrt(dx * dx + dy * dy) - 0.2 * period, m)
    raise ValueError(f"unknown texture {texture!r}; use one of {TEXTURES}")


def _second_shade(rgb: np.ndarray) -> np.ndarray:
    lum = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return rgb * 0.6 if lum > 0.3 else rgb + (1 - rgb) * 0.3


def render_videos(specs, frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """Render ``specs`` (a sequence of :class:`VideoSpec`) as float ``[N, F, H, W, 3]`` in [0, 1].

    Runs on ``device`` (default CPU); memory is a few ``N * F * H * W`` float tensors.
    """
    specs = list(specs)
    if not specs or not all(isinstance(s, VideoSpec) for s in specs):
        raise ValueError("specs must be a non-empty sequence of VideoSpec (see sample_spec)")
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n, m = len(specs), min(height, width)
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    traj = [_trajectory(s, t) for s in specs]

    def stack(k, scale=1.0):
        return torch.as_tensor(np.stack([p[k] for p in traj]) * scale, dtype=torch.float32, device=device)

    cx = stack(0, width / m).view(n, frames, 1, 1)  # centres in units of min(H, W)
    cy = stack(1, height / m).view(n, frames, 1, 1)
    r = stack(2).view(n, frames, 1, 1)
    rgb = stack(3).view(n, frames, 1, 1, 3)
    X = ((torch.arange(width, device=device, dtype=torch.float32) + 0.5) / m).view(1, 1, 1, width)
    Y = ((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / m).view(1, 1, height, 1)

    sdf = torch.empty(n, frames, height, width, device=device)
    for shape, fn in _SDF.items():
        sel = [i for i, s in enumerate(specs) if s.attrs.shape == shape]
        if sel:
            idx = torch.tensor(sel, device=device)
            sdf[idx] = fn(X - cx[idx], Y - cy[idx], r[idx])
    alpha = _coverage(sdf, m).unsqueeze(-1)

    shade = torch.zeros(n, 1, height, width, device=device)
    for texture in TEXTURES:
        sel = [i for i, s in enumerate(specs) if s.attrs.texture == texture]
        if sel:
            idx = torch.tensor(sel, device=device)
            period = torch.tensor([specs[i].texture_period for i in sel], device=device).view(-1, 1, 1, 1)
            shade[idx] = _texture_mask(texture, X, Y, period, m)
    bg = np.stack([COLORS[s.attrs.background] for s in specs])
    bg2 = np.stack([_second_shade(np.asarray(c)) for c in bg])
    bg = torch.as_tensor(bg, dtype=torch.float32, device=device).view(n, 1, 1, 1, 3)
    bg2 = torch.as_tensor(bg2, dtype=torch.float32, device=device).view(n, 1, 1, 1, 3)
    shade = shade.unsqueeze(-1)
    background = bg * (1 - shade) + bg2 * shade
    return background * (1 - alpha) + rgb * alpha


class ProceduralVideoDataset(torch.utils.data.Dataset):
    """``length`` procedural videos of ``frames x height x width``; item ``i`` is
    ``(video uint8 [F, H, W, 3], prompt str)``, the same for the same ``(seed, i)`` everywhere."""

    def __init__(self, length: int = 10_000, seed: int = 0, frames: int = 33, height: int = 256, width: int = 256):
        for name, v in (("length", length), ("frames", frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.length, self.seed = length, seed
        self.frames, self.height, self.width = frames, height, width

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> VideoSpec:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of {self.length} videos")
        return sample_spec(self.seed, index % self.length)

    def __getitem__(self, index: int):
        spec = self.spec(index)
        video = render_videos([spec], self.frames, self.height, self.width)[0]
        return (video * 255).round().to(torch.uint8), spec.prompt
