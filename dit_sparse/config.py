"""`SparseAttentionConfig`: everything `apply_sparse_attention` needs to know, as one plain dataclass.

A config says *what* attention to run (``mode`` and the pattern spec), *when* (the step schedule:
dense warm-up steps, dense layers, output reuse), *how long a pattern lives* (cache policy) and *on which
backend*. It is pure data: JSON-safe through :meth:`SparseAttentionConfig.to_dict` /
:meth:`SparseAttentionConfig.from_dict`, validated on construction, never mutated by ``apply_*`` (they
work on a copy). Named speed presets come from :meth:`SparseAttentionConfig.preset` (see
``dit_sparse/presets.py``).

Example::

    cfg = SparseAttentionConfig(pattern="tile3d+topk", window=(3, 3, 3), topk_ratio=0.1, dense_steps=0.2)
    cfg = SparseAttentionConfig.preset("fast")
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SparseAttentionConfig", "MODES", "PATTERNS", "BACKENDS", "REUSE_MODES", "REUSE_SCOPES",
           "SLA_FEATURE_MAPS"]

MODES = ("sparse", "sla", "dense")
PATTERNS = ("dense", "tile3d", "spatiotemporal", "topk")
BACKENDS = ("auto", "triton", "torch")
REUSE_MODES = ("residual", "output")
REUSE_SCOPES = ("attention", "block")
SLA_FEATURE_MAPS = ("softmax", "elu", "relu")
KERNEL_BLOCK_SIZES = (64, 128)


@dataclass
class SparseAttentionConfig:
    """How dit-sparse replaces self-attention in a diffusion transformer.

    Attention:
        mode: ``"sparse"`` (block-sparse attention with ``pattern``), ``"sla"`` (sparse-linear attention,
            for models fine-tuned with ``dit-sparse finetune``; see the ``sla_*`` fields) or ``"dense"``
            (our code path with every block kept: density 1, useful as a reference).
        pattern: patterns joined by ``+`` (their union): ``tile3d``, ``spatiotemporal``, ``topk``,
            ``dense``; e.g. ``"tile3d+topk"``.
        window: ``(t, h, w)`` window of the ``tile3d`` pattern, in tiles (odd numbers centre it).
        topk_ratio / topk_threshold: the ``topk`` pattern keeps this fraction of key blocks per query
            block, or the smallest set of blocks holding this cumulative score mass (exactly one of them
            when ``topk`` is in ``pattern``).
        tile: ``(t, h, w)`` tile of the token permutation, in tokens.
        block_size: query/key block size of the kernels (64 or 128).
        text_always_on: joint-attention models (CogVideoX, HunyuanVideo, Mochi, Flux) keep every text
            row and column dense.
        first_frame_sink: number of leading latent frames every query attends to (0 = off).

    Sparse-linear attention (``mode="sla"``; ``pattern`` and its parameters are not used there):
        sla_topk: fraction of key blocks per query block attended exactly (the rest goes through the
            linear part); ``None``: the value stored in ``sla_weights``, else 0.05.
        sla_feature_map: phi of the linear part, ``"softmax"``, ``"elu"`` or ``"relu"``; ``None``: the
            one stored in ``sla_weights``, else ``"softmax"``.
        sla_weights: path of a ``sla_weights.safetensors`` written by ``dit-sparse finetune`` (keys by
            attention module path); ``None``: fresh modules whose projection is zero (then SLA is
            block-sparse attention over the top ``sla_topk`` blocks).

    Schedule:
        dense_steps: the first steps run dense: a fraction of the steps (float in ``[0, 1)``) or a
            number of steps (int >= 0).
        dense_layers: indices of self-attention layers that always run dense.
        reuse_every: after the dense warm-up, compute on every ``reuse_every``-th step and reuse in
            between (``None`` = never reuse); what is reused is set by ``reuse_scope``; see
            ``dit_sparse.schedule``.
        reuse_scope: ``"attention"``: each self-attention layer reuses its attention as ``reuse_mode``
            says; ``"block"``: a reuse step skips whole transformer blocks (attention, cross-attention and
            feed-forward) and returns each block's input plus the residual (output - input) the block
            produced on the last computing step, for the video and, in joint-attention blocks, the text
            stream (see ``dit_sparse.block_cache``).
        reuse_mode: (``reuse_scope="attention"`` only) ``"output"``: a reuse step returns the attention
            output kept from the last computing step (no attention at all); ``"residual"``: the step
            before a reuse run is dense and keeps ``dense - sparse``, reuse steps compute sparse
            attention and add it back.
        always_compute_blocks: (``reuse_scope="block"`` only) transformer blocks that compute on every
            step, numbered in execution order over all block lists (Flux / HunyuanVideo: double-stream
            then single-stream blocks); negative indices count from the end. The default ``(0, -1)``
            keeps the first and the last block computing: they see the current step's input and
            timestep, which the cached residuals of the blocks between them cannot (a cost of 2 of
            the model's blocks per reuse step, e.g. 2 of Wan 1.3B's 30).

    Pattern cache:
        refresh_every: rebuild a cached layout after this many steps (``None`` = keep it).
        drift_threshold: rebuild when the pooled Q/K signature moved by more than this relative L2
            change (``None`` = no drift check).
        share_across_layers: one layout for all layers with the same pattern and shape.

    Other:
        skip_layers: indices of self-attention layers left completely untouched (stock processor).
        backend: kernel backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"``, ``"torch"``.
    """

    mode: str = "sparse"
    pattern: str = "tile3d"
    window: tuple[int, int, int] = (3, 3, 3)
    topk_ratio: float | None = None
    topk_threshold: float | None = None
    tile: tuple[int, int, int] = (4, 4, 4)
    block_size: int = 128
    text_always_on: bool = True
    first_frame_sink: int = 0
    sla_topk: float | None = None
    sla_feature_map: str | None = None
    sla_weights: str | None = None
    dense_steps: float | int = 0.2
    dense_layers: tuple[int, ...] = ()
    reuse_every: int | None = None
    reuse_scope: str = "attention"
    reuse_mode: str = "residual"
    always_compute_blocks: tuple[int, ...] = (0, -1)
    refresh_every: int | None = None
    drift_threshold: float | None = None
    share_across_layers: bool = False
    skip_layers: tuple[int, ...] = ()
    backend: str = "auto"
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        self.window = _int_triple("window", self.window)
        self.tile = _int_triple("tile", self.tile)
        self.dense_layers = _index_tuple("dense_layers", self.dense_layers)
        self.skip_layers = _index_tuple("skip_layers", self.skip_layers)
        self.always_compute_blocks = _signed_index_tuple("always_compute_blocks", self.always_compute_blocks)
        if isinstance(self.sla_weights, os.PathLike):
            self.sla_weights = os.fspath(self.sla_weights)
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def pattern_parts(self) -> tuple[str, ...]:
        """The pattern names of ``pattern``, in order (``"tile3d+topk"`` -> ``("tile3d", "topk")``)."""
        return tuple(p.strip() for p in self.pattern.split("+"))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field that is wrong and what to use instead."""
        _choice("mode", self.mode, MODES)
        _choice("backend", self.backend, BACKENDS)
        _choice("reuse_mode", self.reuse_mode, REUSE_MODES)
        _choice("reuse_scope", self.reuse_scope, REUSE_SCOPES)
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise ValueError(f"pattern must be a non-empty string like 'tile3d' or 'tile3d+topk', got {self.pattern!r}")
        parts = self.pattern_parts
        for part in parts:
            if part not in PATTERNS:
                raise ValueError(
                    f"unknown pattern {part!r} in pattern={self.pattern!r}; use one of {', '.join(PATTERNS)}, "
                    f"joined by '+'"
                )
        if len(set(parts)) != len(parts):
            raise ValueError(f"pattern={self.pattern!r} names a pattern twice; name each once")
        has_topk = "topk" in parts
        if has_topk and (self.topk_ratio is None) == (self.topk_threshold is None):
            raise ValueError(
                f"pattern {self.pattern!r} uses topk: set exactly one of topk_ratio (fraction of key blocks, "
                f"e.g. 0.1) or topk_threshold (cumulative score mass, e.g. 0.9); got topk_ratio="
                f"{self.topk_ratio!r}, topk_threshold={self.topk_threshold!r}"
            )
        for name in ("topk_ratio", "topk_threshold"):
            v = getattr(self, name)
            if v is None:
                continue
            if not has_topk:
                raise ValueError(f"{name}={v!r} is set but pattern={self.pattern!r} has no topk; add '+topk' or unset it")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
                raise ValueError(f"{name} must be a float in (0, 1], got {v!r}")
        self._validate_sla()
        if self.block_size not in KERNEL_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ValueError(f"block_size must be one of {KERNEL_BLOCK_SIZES} (kernel block sizes), got {self.block_size!r}")
        for name in ("text_always_on", "share_across_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _nonneg_int("first_frame_sink", self.first_frame_sink)
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise ValueError(f"dense_steps must be a fraction in [0, 1) or a step count >= 0, got {d!r}")
        if isinstance(d, float) and not (0.0 <= d < 1.0):
            raise ValueError(
                f"dense_steps={d!r}: a float is a fraction of the steps and must be in [0, 1); pass an int for "
                f"a number of steps"
            )
        if isinstance(d, int) and d < 0:
            raise ValueError(f"dense_steps must be >= 0, got {d!r}")
        for name in ("reuse_every", "refresh_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1 (steps), got {v!r}")
        t = self.drift_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t))):
            raise ValueError(f"drift_threshold must be None or a finite float >= 0, got {t!r}")
        overlap = set(self.dense_layers) & set(self.skip_layers)
        if overlap:
            raise ValueError(f"layers {sorted(overlap)} are in both dense_layers and skip_layers; pick one")

    def _validate_sla(self) -> None:
        given = [n for n in ("sla_topk", "sla_feature_map", "sla_weights") if getattr(self, n) is not None]
        if self.mode != "sla":
            if given:
                raise ValueError(f"{', '.join(given)} only apply to mode='sla' (mode is {self.mode!r}); set mode='sla' "
                                 f"or leave them None")
            return
        t = self.sla_topk
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < t <= 1.0)):
            raise ValueError(
                f"sla_topk is the fraction of key blocks attended exactly and must be in (0, 1], got {t!r}"
            )
        if self.sla_feature_map is not None:
            _choice("sla_feature_map", self.sla_feature_map, SLA_FEATURE_MAPS)
        w = self.sla_weights
        if w is not None and (not isinstance(w, str) or not w):
            raise ValueError(f"sla_weights must be None or the path of an SLA weights file, got {w!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); :meth:`from_dict` reads it back."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseAttentionConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` listing the known ones."""
        if not isinstance(data, dict):
            raise ValueError(f"from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SparseAttentionConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def copy(self, **changes) -> "SparseAttentionConfig":
        """A validated copy with ``changes`` applied (the original is untouched)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SparseAttentionConfig":
        """A named speed preset: ``quality``, ``balanced``, ``fast``, ``turbo`` or ``dense``.

        ``overrides`` replace single fields, e.g. ``preset("fast", dense_steps=0.3)``. See
        :data:`dit_sparse.presets.PRESETS` for what each one is.
        """
        from .presets import preset_config

        return preset_config(name, **overrides)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")


def _nonneg_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _int_triple(name: str, value) -> tuple[int, int, int]:
    try:
        t = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a (t, h, w) triple of positive ints, got {value!r}") from None
    if len(t) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in t):
        raise ValueError(f"{name} must be a (t, h, w) triple of positive ints, got {value!r}")
    return t


def _index_tuple(name: str, value) -> tuple[int, ...]:
    try:
        t = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of layer indices (ints >= 0), got {value!r}") from None
    for v in t:
        _nonneg_int(f"{name} entry", v)
    return tuple(sorted(set(t)))


def _signed_index_tuple(name: str, value) -> tuple[int, ...]:
    """Indices that may count from the end (negative); duplicates dropped, order kept."""
    what = f"{name} must be a list of block indices (ints; negative counts from the end), got {value!r}"
    if isinstance(value, (str, bytes)):
        raise ValueError(what)
    try:
        t = tuple(value)
    except TypeError:
        raise ValueError(what) from None
    for v in t:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} entries must be ints (negative counts from the end), got {v!r}")
    return tuple(dict.fromkeys(t))
