"""Did a generated video show what its procedural prompt asked? An automatic judge from pixels alone.

:func:`judge_video` reads a video of the procedural set's kind (:mod:`dit_sparse.data.procedural`: one
coloured shape over a plain or textured background) and estimates, from its pixels only, the four things
a prompt asks for: the shape's colour, the background colour, the motion (``moving left|right|up|down``,
``bouncing``, ``growing``, ``shrinking``, ``turning <colour>``) and the shape. It never looks at a spec's
hidden parameters (start position, size, speed), so it judges a generated video exactly as a render.

How (on a copy average-pooled to about 128 pixels and blurred 3x3, which also averages out pixel noise):

* background: each named colour is tried as a background of two shades, itself and its second shade
  (``_second_shade`` of procedural.py: the other shade of a textured background) and their mixes; the one
  that explains the pixels best wins, unless they all sit at its second shade's end. The second shade then
  counts as background only where it shows all over the frame (a texture); on a plain background, mixes up
  to half way still do (texture left faint).
* shape colour: pixels nearer to another named colour than to the background are the foreground; per frame,
  the median of its 30% farthest from the background (the least mixed with it at blurred edges); the first
  frames' colour, as the nearest named colour, is the shape colour, the last frames' the colour of ``turning``.
* shape mask: per frame, the pixels nearer to that frame's shape colour than to the background, so a
  blurred edge is cut at half coverage.
* motion: straight-line fits over time of the mask's centroid (fractions of the frame) and log area. A
  rise and fall of the centroid by :data:`BOUNCE_HEIGHT` is ``bouncing``; else the largest of the x / y
  displacement (against :data:`MOVE_DISTANCE`) and area change (against :data:`LOG_AREA_CHANGE`) that passes
  its threshold; else a change of colour is ``turning <end colour>``; else :data:`STILL`.
* shape: IoU of the mask with each shape drawn by procedural.py's signed distances at the mask's centroid
  (+-1 pixel) and at the size that matches its area (x0.85, 1, 1.15), averaged over the first frame (the
  sharpest in a causal video VAE's output) and the frames where the mask is largest; best IoU wins.

Accuracy, measured 2026-11-30 on CPU (``scripts/prompt_following.py --judge-only --spec-seed 12345 --n 300``
for the renders; the default model's VAE, encode + decode, on ``sample_spec(777, i)`` for the last rows):

==============================================  ============  ==========  ======  =====
videos                                          shape colour  background  motion  shape
==============================================  ============  ==========  ======  =====
300 renders, 17 x 128 x 128                     100%          100%        100%    100%
the same, degraded (:func:`degrade_video`)      100%          100%        100%    100%
300 renders, 33 x 256 x 256                     100%          100%        100%    100%
the same, degraded                              100%          100%        100%    100%
96 renders through the VAE, 17 x 128 x 128      90.6%         100%        91.7%   28.1%
14 renders through the VAE, 17 x 256 x 256      100%          100%        85.7%   92.9%
==============================================  ============  ==========  ======  =====

Degraded: Gaussian blur of 1.5 pixels per 128 pixels, a colour offset of up to +-0.04 per channel and pixel
noise of 0.05. What stays hard: a ring growing from its smallest size, whose 3-pixel band a blur mixes with
the background (a black ring on white reads grey in the first frames; one such miss in 300 degraded 9-frame
videos); and what the VAE loses - at 128 pixels the default model's VAE turns every shape into a round blob
(so the VAE rows are the ceiling of a generation, not the judge's error), and at 17 frames (5 latent frames)
it smears a fast bounce into a still shape with a ghost below. A call on 33 x 256 x 256 frames takes about
0.3 s on one CPU core.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .procedural import _SDF, VideoSpec, _second_shade
from .vocabulary import COLORS, MOTIONS, SHAPES, PromptAttributes, parse_prompt

__all__ = [
    "ATTRIBUTES",
    "STILL",
    "accuracy",
    "asked_attributes",
    "chance_accuracy",
    "degrade_video",
    "judge_video",
    "motion_phrase",
]

# What the judge scores, in report order: PromptAttributes fields (motion as its prompt phrase).
ATTRIBUTES: tuple[str, ...] = ("color", "background", "motion", "shape")
STILL = "still"  # the predicted motion when nothing moves, grows, shrinks or changes colour

# Thresholds, as fractions of the frame (x of its width, y of its height) or of the log area. The procedural
# set moves shapes by 0.4-0.55 of the frame, bounces them 0.35-0.5 high and grows / shrinks their radius
# 2.2-3x (area 4.8-9x), so each threshold sits at about half of the smallest real value.
# The area threshold sits higher (3x, not the 2.2x half way in log terms): blurred by a VAE, a thin shape
# that changes colour can change its measured area 2x.
MOVE_DISTANCE = 0.2
BOUNCE_HEIGHT = 0.12
LOG_AREA_CHANGE = math.log(3.0)
COLOR_TOLERANCE = 0.15  # RGB distance within which a pixel counts as a given colour (named colours are >= 0.29 apart)
MIN_BASE_SHARE = 0.3  # a background's own shade covers >= 50% of it (striped, checkered) or more (dotted, plain)
_SECOND_END = 0.25  # the part of the mix of a background's shades that counts as its second shade
TEXTURE_CELLS = 12  # of 16; a shape covers at most 9 (its diameter is at most 0.42 of the frame)
MIN_AREA = 0.002  # a frame with less foreground than this share of its pixels has no shape in it
CORE_SHARE = 0.3  # share of a frame's foreground (the pixels farthest from the background) that gives its colour
EDGE_SHARE = 0.15  # first / last share of the frames that give the start / end colour
SHAPE_FRAMES = 3  # the shape is fitted in this many frames (those with the largest foreground)
SHAPE_SCALES = (0.85, 1.0, 1.15)  # template sizes tried around the area-matched one
_WORK_SIZE = 128  # videos are average-pooled to about this many pixels on their shorter side

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_BASE = torch.tensor([COLORS[c] for c in _COLOR_NAMES], dtype=torch.float32)  # [9, 3]
_SECOND = torch.tensor(np.stack([_second_shade(np.asarray(COLORS[c])) for c in _COLOR_NAMES]),
                       dtype=torch.float32)  # [9, 3]


# ---------------------------------------------------------------------------------------------- inputs
def asked_attributes(prompt_or_attrs) -> PromptAttributes:
    """The attributes a prompt (str), :class:`PromptAttributes` or :class:`VideoSpec` asks for.

    A str goes through :func:`parse_prompt`, whose ValueError names the word that does not fit."""
    if isinstance(prompt_or_attrs, PromptAttributes):
        return prompt_or_attrs
    if isinstance(prompt_or_attrs, VideoSpec):
        return prompt_or_attrs.attrs
    if isinstance(prompt_or_attrs, str):
        return parse_prompt(prompt_or_attrs)
    raise ValueError(
        f"prompt_or_attrs must be a prompt str, PromptAttributes or VideoSpec, got {type(prompt_or_attrs).__name__}"
    )


def motion_phrase(attrs: PromptAttributes) -> str:
    """The motion as the prompt says it: ``"moving left"``, ``"bouncing"``, ``"turning green"``, ..."""
    return f"turning {attrs.target_color}" if attrs.motion == "turning" else attrs.motion


def _as_frames(video) -> torch.Tensor:
    """``video`` (numpy or torch ``[F, H, W, 3]``, uint8 or float in [0, 1]) as float32 torch on the CPU."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video must be a numpy array or torch tensor [F, H, W, 3], got {type(video).__name__}")
    if video.dim() != 4 or video.shape[-1] != 3:
        hint = "; judge one video at a time" if video.dim() == 5 else ""
        raise ValueError(
            f"video must be [F, H, W, 3] (frames, height, width, RGB), got shape {tuple(video.shape)}{hint}"
        )
    frames, height, width = video.shape[:3]
    if frames < 2 or min(height, width) < 16:
        raise ValueError(f"video must have >= 2 frames of >= 16x16 pixels to judge motion and shape, got "
                         f"{frames} frames of {height}x{width}")
    video = video.detach().cpu()
    if video.dtype == torch.uint8:
        return video.float() / 255.0
    if not video.is_floating_point():
        raise ValueError(f"video must be uint8 (0..255) or float (0..1), got dtype {video.dtype}")
    video = video.float()
    if not torch.isfinite(video).all():
        raise ValueError("video holds NaN or infinite values")
    low, high = float(video.min()), float(video.max())
    if low < -0.02 or high > 1.02:
        raise ValueError(f"float video values must lie in [0, 1], got [{low:.3g}, {high:.3g}]; a model input in "
                         "[-1, 1] becomes a video with dit_sparse.data.model_input_to_video")
    return video.clamp(0.0, 1.0)


def _working_copy(video: torch.Tensor) -> torch.Tensor:
    """Pool ``[F, H, W, 3]`` to about :data:`_WORK_SIZE` pixels and blur it with a 3x3 binomial filter."""
    x = video.permute(0, 3, 1, 2)  # [F, 3, H, W]
    factor = max(1, min(x.shape[-2:]) // _WORK_SIZE)
    if factor > 1:
        x = F.avg_pool2d(x, factor)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------- colours
def _background(pixels: torch.Tensor) -> int:
    """Index (into COLORS) of the background colour of ``pixels`` [P, 3].

    Each named colour is tried as a background of two shades (itself, its second shade and their mixes): the
    one that explains the pixels best (mean distance, capped at :data:`COLOR_TOLERANCE`) wins, among those
    where at least :data:`MIN_BASE_SHARE` of the explained pixels are not at the second shade's end of the
    mix (the last quarter of the way). That condition keeps a grey background tinted towards 0.56 from
    passing for white's darker shade, yet accepts a texture that a VAE has blurred into its mean colour.
    """
    costs, eligible = [], []
    for i in range(len(_COLOR_NAMES)):
        d_mix, w = _segment_projection(pixels, _BASE[i], _SECOND[i])
        costs.append(float(d_mix.clamp(max=COLOR_TOLERANCE).mean()))
        explained = d_mix < COLOR_TOLERANCE
        base_like = explained & (w <= 1.0 - _SECOND_END)
        eligible.append(int(base_like.sum()) >= MIN_BASE_SHARE * max(1, int(explained.sum())))
    candidates = [i for i in range(len(_COLOR_NAMES)) if eligible[i]] or list(range(len(_COLOR_NAMES)))
    return min(candidates, key=lambda i: costs[i])


def _has_texture(frames: torch.Tensor, background: int) -> bool:
    """Whether the background's second shade shows all over the frame (a texture), not just in one place
    (a shape of a colour near it): pixels nearest to it among all named colours in at least
    :data:`TEXTURE_CELLS` of a 4 x 4 grid of cells (at least 2% of a cell), in the median frame."""
    palette = torch.cat([_BASE, _SECOND[background:background + 1]])
    second = torch.cdist(frames.reshape(-1, 3), palette).argmin(dim=1).view(frames.shape[:-1]) == len(_COLOR_NAMES)
    cells = F.adaptive_avg_pool2d(second.float().unsqueeze(1), 4).flatten(1)  # [F, 16] share per cell
    return float((cells >= 0.02).sum(dim=1).float().median()) >= TEXTURE_CELLS


def _segment_projection(pixels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each of ``pixels`` [..., 3] to the colour segment from ``a`` to ``b`` (all their mixes),
    and where along it the nearest point lies (0 at ``a``, 1 at ``b``)."""
    ab = b - a
    w = ((pixels - a) @ ab / (ab @ ab)).clamp(0.0, 1.0)
    return (pixels - a - w.unsqueeze(-1) * ab).norm(dim=-1), w


def _background_distance(frames: torch.Tensor, background: int, textured: bool) -> torch.Tensor:
    """Distance [F, H, W] of each pixel to the background: to its shade and the mixes with its second shade
    (all of them on a textured background; up to half way on a plain one, enough for faint texture left)."""
    base, second = _BASE[background], _SECOND[background]
    return _segment_projection(frames, base, second if textured else (base + second) / 2)[0]


def _candidate_foreground(frames: torch.Tensor, d_background: torch.Tensor, background: int) -> torch.Tensor:
    """Bool ``[F, H, W]``: pixels nearer to a named colour other than the background than to the background."""
    others = torch.cat([_BASE[:background], _BASE[background + 1:]])
    d_other = torch.cdist(frames.reshape(-1, 3), others).min(dim=1).values.view(frames.shape[:-1])
    return d_other < d_background


def _shape_mask(frames: torch.Tensor, d_background: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Bool ``[F, H, W]``: pixels nearer to their frame's shape colour (``colors`` [F, 3], NaN: no shape)
    than to the background - the shape cut at half coverage wherever its edge is blurred."""
    d_shape = (frames - colors.nan_to_num(nan=2.0)[:, None, None, :]).norm(dim=-1)
    return (d_shape < d_background) & ~torch.isnan(colors).any(dim=1)[:, None, None]


def _nearest_color(rgb: torch.Tensor) -> str:
    return _COLOR_NAMES[int((_BASE - rgb).norm(dim=1).argmin())]


def _frame_colors(frames: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor,
                  d_background: torch.Tensor) -> torch.Tensor:
    """Median colour [F, 3] of each valid frame's foreground core: its :data:`CORE_SHARE` of pixels farthest
    from the background, the least mixed with it where edges are blurred (a thin ring at a small size has
    hardly a pixel of its own colour left); NaN for frames without a shape."""
    colors = torch.full((frames.shape[0], 3), float("nan"))
    for f in torch.nonzero(valid).flatten().tolist():
        pixels, distance = frames[f][mask[f]], d_background[f][mask[f]]
        core = distance >= torch.quantile(distance, 1.0 - CORE_SHARE)
        colors[f] = pixels[core].median(dim=0).values
    return colors


def _start_and_end_colors(colors: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Median of the per-frame colours [F, 3] over the first and over the last :data:`EDGE_SHARE` of the
    frames that show a shape (at least one frame each); None, None when no frame does."""
    shown = torch.nonzero(~torch.isnan(colors).any(dim=1)).flatten()
    if len(shown) == 0:
        return None, None
    edge = max(1, round(EDGE_SHARE * colors.shape[0]))
    return colors[shown[:edge]].median(dim=0).values, colors[shown[-edge:]].median(dim=0).values


# ---------------------------------------------------------------------------------------------- motion
def _centroids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid x, y [F] of each non-empty bool mask [F, H, W], as fractions of the width / height."""
    height, width = mask.shape[1:]
    weight = mask.float()
    total = weight.sum(dim=(1, 2))
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    return (weight.sum(dim=1) * xs).sum(dim=1) / total, (weight.sum(dim=2) * ys).sum(dim=1) / total


def _slope(t: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of ``y`` over ``t`` (so slope x 1 is the change from t=0 to t=1)."""
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / (tc * tc).sum())


def _bounce_height(y: torch.Tensor) -> float:
    """The largest rise-and-fall of a centroid track ``y`` [F] (``y`` grows downwards, as in images): the
    largest h such that some frame lies h above an earlier frame and h above a later one."""
    before = torch.cummax(y, dim=0).values
    after = torch.flip(torch.cummax(torch.flip(y, [0]), dim=0).values, [0])
    return float(torch.minimum(before - y, after - y).max())


def _motion(t, cx, cy, log_area, start_color: str | None, end_color: str | None) -> tuple[str, dict]:
    """The predicted motion phrase and the numbers it was decided from (see the module docstring)."""
    dx, dy, d_area = _slope(t, cx), _slope(t, cy), _slope(t, log_area)
    bounce = _bounce_height(cy)
    measured = {"displacement_x": dx, "displacement_y": dy, "bounce_height": bounce, "area_ratio": math.exp(d_area)}
    if bounce >= BOUNCE_HEIGHT:
        return "bouncing", measured
    scores = {
        "moving left": -dx / MOVE_DISTANCE, "moving right": dx / MOVE_DISTANCE,
        "moving up": -dy / MOVE_DISTANCE, "moving down": dy / MOVE_DISTANCE,
        "growing": d_area / LOG_AREA_CHANGE, "shrinking": -d_area / LOG_AREA_CHANGE,
    }
    best = max(scores, key=scores.get)
    if scores[best] >= 1.0:
        return best, measured
    if start_color is not None and end_color is not None and end_color != start_color:
        return f"turning {end_color}", measured
    return STILL, measured


# ---------------------------------------------------------------------------------------------- shape
@functools.lru_cache(maxsize=None)
def _area_per_radius2(shape: str) -> float:
    """Area of ``shape`` drawn at radius r, over r^2 (pixels): from its signed distance on a fine grid."""
    r, n = 100.0, 401
    c = torch.arange(n, dtype=torch.float32) - n // 2
    sdf = _SDF[shape](c.view(1, n), c.view(n, 1), torch.tensor(r))
    return float((0.5 - sdf).clamp(0.0, 1.0).sum()) / r**2


def _shape_ious(mask: torch.Tensor) -> dict[str, float]:
    """Best IoU per shape of the bool mask [H, W] with that shape drawn around the mask's centroid (shifted
    by up to one pixel each way) at the radius whose area matches the mask's, times each of
    :data:`SHAPE_SCALES`. Only a box of twice the matched radius around the centroid counts, so stray
    pixels elsewhere in the frame neither move the centre nor enter the IoU."""
    cx, cy, area = _moments(mask)
    reach = math.ceil(2 * math.sqrt(area / math.pi)) + 2
    top, left = max(0, round(cy) - reach), max(0, round(cx) - reach)
    mask = mask[top:round(cy) + reach, left:round(cx) + reach]
    if not mask.any():  # the pixels lie in separate places around an empty middle: no shape fits
        return {shape: 0.0 for shape in SHAPES}
    cx, cy, area = _moments(mask)
    h, w = mask.shape
    X = torch.arange(w, dtype=torch.float32) + 0.5 - cx
    Y = torch.arange(h, dtype=torch.float32) + 0.5 - cy
    shifts = torch.tensor([-1.0, 0.0, 1.0])
    dx = (X.view(1, 1, 1, w) - shifts.view(3, 1, 1, 1)).expand(3, 3, h, w)  # [shift x, shift y, H, W]
    dy = (Y.view(1, 1, h, 1) - shifts.view(1, 3, 1, 1)).expand(3, 3, h, w)
    ious = {}
    for shape in SHAPES:
        r = math.sqrt(area / _area_per_radius2(shape))
        best = 0.0
        for scale in SHAPE_SCALES:
            template = _SDF[shape](dx, dy, torch.tensor(r * scale)) < 0
            inter = (template & mask).sum(dim=(2, 3)).float()
            union = (template | mask).sum(dim=(2, 3)).float()
            best = max(best, float((inter / union).max()))
        ious[shape] = best
    return ious


def _moments(mask: torch.Tensor) -> tuple[float, float, float]:
    """Centroid x, y (pixels) and area (pixels) of a non-empty bool mask [H, W]."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5, float(len(xs))


def _shape(mask: torch.Tensor, area: torch.Tensor, valid: torch.Tensor) -> tuple[str | None, dict[str, float]]:
    """Best shape by mean IoU over the first valid frame (the sharpest in a causal video VAE's output) and
    the valid frames with the largest foreground, :data:`SHAPE_FRAMES` frames in all."""
    ids = torch.nonzero(valid).flatten()
    if len(ids) == 0:
        return None, {}
    largest = ids[area[ids].argsort(descending=True)].tolist()
    picked = list(dict.fromkeys([int(ids[0]), *largest]))[:SHAPE_FRAMES]
    per_frame = [_shape_ious(mask[f]) for f in picked]
    ious = {s: sum(p[s] for p in per_frame) / len(per_frame) for s in SHAPES}
    return max(ious, key=ious.get), ious


# ---------------------------------------------------------------------------------------------- judging
def judge_video(video, prompt_or_attrs) -> dict:
    """Judge whether ``video`` shows what ``prompt_or_attrs`` asks, from its pixels alone.

    Args:
        video: ``[F, H, W, 3]`` (F >= 2, H, W >= 16), uint8 or float in [0, 1], numpy or torch.
        prompt_or_attrs: a procedural prompt (``"a red circle moving left on a blue background"``), or its
            :class:`PromptAttributes`, or a :class:`VideoSpec` (only its attributes are used).

    Returns:
        ``{attr: {"predicted", "asked", "correct"}}`` for every attr of :data:`ATTRIBUTES` (motion as its
        prompt phrase, e.g. ``"turning green"``; a prediction is None when no shape was found), plus
        ``"all_correct"``, ``"found"`` (did any frame show a shape) and ``"measured"``: the numbers behind
        the predictions - ``displacement_x`` / ``_y`` (centroid, fitted over the video, as fractions of the
        frame), ``bounce_height`` (same unit), ``area_ratio`` (end / start, fitted), ``ious`` (per shape),
        ``start_rgb`` / ``end_rgb`` (shape colour), ``background_rgb``, ``textured`` and
        ``frames_with_shape``; the motion numbers only when at least two frames show a shape.

    Raises ValueError for a video that is not ``[F, H, W, 3]`` in range, or a prompt the grammar does not
    parse (naming the word that does not fit).

    Example::

        from dit_sparse.data import render_videos, sample_spec
        spec = sample_spec(777, 0)
        verdict = judge_video(render_videos([spec], 17, 128, 128)[0], spec.prompt)
        verdict["all_correct"], verdict["motion"]["predicted"]
    """
    asked = asked_attributes(prompt_or_attrs)
    predicted, measured = _look(_working_copy(_as_frames(video)))
    wanted = {"color": asked.color, "background": asked.background, "motion": motion_phrase(asked),
              "shape": asked.shape}
    verdict = {a: {"predicted": predicted[a], "asked": wanted[a], "correct": predicted[a] == wanted[a]}
               for a in ATTRIBUTES}
    verdict["all_correct"] = all(verdict[a]["correct"] for a in ATTRIBUTES)
    verdict["found"] = measured["frames_with_shape"] > 0
    verdict["measured"] = _plain(measured)
    return verdict


def _look(frames: torch.Tensor) -> tuple[dict, dict]:
    """What the working copy ``frames`` [F, H, W, 3] shows: the predicted attributes, and the measurements."""
    n_frames = frames.shape[0]
    background = _background(frames[:, ::2, ::2].reshape(-1, 3))  # every 4th pixel is plenty for a vote
    textured = _has_texture(frames, background)
    d_background = _background_distance(frames, background, textured)
    candidates = _candidate_foreground(frames, d_background, background)
    colors = _frame_colors(frames, candidates, candidates.float().mean(dim=(1, 2)) >= MIN_AREA, d_background)
    mask = _shape_mask(frames, d_background, colors)
    area = mask.float().mean(dim=(1, 2))
    valid = area >= MIN_AREA

    start_rgb, end_rgb = _start_and_end_colors(colors)
    start_color = _nearest_color(start_rgb) if start_rgb is not None else None
    end_color = _nearest_color(end_rgb) if end_rgb is not None else None
    measured = {"background_rgb": frames[~candidates].median(dim=0).values if not candidates.all() else None,
                "textured": textured, "start_rgb": start_rgb, "end_rgb": end_rgb,
                "frames_with_shape": int(valid.sum())}
    motion = None
    if int(valid.sum()) >= 2:
        ids = torch.nonzero(valid).flatten()
        cx, cy = _centroids(mask[ids])
        motion, numbers = _motion(ids.float() / (n_frames - 1), cx, cy, torch.log(area[ids]), start_color, end_color)
        measured.update(numbers)
    shape, measured["ious"] = _shape(mask, area, valid)
    predicted = {"color": start_color, "background": _COLOR_NAMES[background], "motion": motion, "shape": shape}
    return predicted, measured


def _plain(value):
    """Tensors in ``value`` as floats / lists (the verdict goes into JSON reports)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return [round(float(v), 4) for v in value.flatten()] if value.numel() > 1 else float(value)
    return value


# ---------------------------------------------------------------------------------------------- summaries
def accuracy(verdicts: Sequence[dict]) -> dict[str, float]:
    """Share of ``verdicts`` (from :func:`judge_video`) judged correct, per attribute and ``all_correct``."""
    if not verdicts:
        raise ValueError("accuracy needs at least one verdict")
    out = {a: sum(v[a]["correct"] for v in verdicts) / len(verdicts) for a in ATTRIBUTES}
    out["all_correct"] = sum(v["all_correct"] for v in verdicts) / len(verdicts)
    return out


def _prompt_distribution() -> dict[tuple[str, str, str, str], float]:
    """Probability of each (colour, background, motion phrase, shape) - the order of :data:`ATTRIBUTES` -
    that ``sample_spec`` draws.

    Mirrors sample_spec's choices: colour, shape and motion uniform; for ``turning`` a target colour
    uniform over the other colours; the background uniform over the colours not used by the shape.
    """
    colors, p = _COLOR_NAMES, {}
    base = 1.0 / (len(colors) * len(SHAPES) * len(MOTIONS))
    for color in colors:
        for shape in SHAPES:
            for motion in MOTIONS:
                targets = [c for c in colors if c != color] if motion == "turning" else [None]
                for target in targets:
                    used = {color, target}
                    backgrounds = [c for c in colors if c not in used]
                    phrase = f"turning {target}" if target else motion
                    for background in backgrounds:
                        p[(color, background, phrase, shape)] = base / len(targets) / len(backgrounds)
    return p


def chance_accuracy() -> dict[str, float]:
    """Expected accuracy per attribute (and of all four) of a judge that ignores the video and answers
    with the attributes of another prompt drawn like :func:`~dit_sparse.data.sample_spec` draws them:
    the sum of squared probabilities of each value (for ``all_correct``, of each combination)."""
    joint = _prompt_distribution()
    out = {}
    for i, attr in enumerate(ATTRIBUTES):  # the key order of _prompt_distribution
        marginal: dict[str, float] = {}
        for key, p in joint.items():
            marginal[key[i]] = marginal.get(key[i], 0.0) + p
        out[attr] = sum(p * p for p in marginal.values())
    out["all_correct"] = sum(p * p for p in joint.values())
    return {a: out[a] for a in (*ATTRIBUTES, "all_correct")}


# ---------------------------------------------------------------------------------------------- testing aid
def degrade_video(video: torch.Tensor, blur_sigma: float = 1.5, noise_std: float = 0.05, color_shift: float = 0.04,
                  seed: int = 0) -> torch.Tensor:
    """``video`` float ``[F, H, W, 3]`` in [0, 1] roughly as a VAE or diffusion model returns it: a Gaussian
    blur of ``blur_sigma`` pixels, a per-video colour offset uniform in +-``color_shift`` per channel, and
    pixel noise of standard deviation ``noise_std``; clipped to [0, 1]. Deterministic for ``seed``."""
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError("degrade_video takes a float torch tensor [F, H, W, 3]")
    generator = torch.Generator().manual_seed(seed)
    x = video.float().permute(0, 3, 1, 2)
    if blur_sigma > 0:
        radius = max(1, math.ceil(3 * blur_sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / blur_sigma) ** 2)
        taps = taps / taps.sum()
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    shift = (torch.rand(1, 3, 1, 1, generator=generator) * 2 - 1) * color_shift
    x = x + shift + noise_std * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()
