"""Pattern cache: reuse block layouts across denoising steps, layers and prompts.

Searching a sparse pattern (pooled Q/K scores, top-k, head classification) costs time on every
attention call. Between neighbouring denoising steps the pattern barely changes, so
:class:`PatternCache` keeps the :class:`~dit_sparse.block_layout.BlockLayout` a pattern built and
serves it again until

* ``refresh_every`` steps have passed since it was built (``step - built_step >= refresh_every``), or
* a cheap drift check fires: the caller passes a small ``signature`` tensor (for example the
  mean-pooled Q/K block means) and the relative L2 change against the signature stored at build time,
  ``||new - old|| / ||old||``, exceeds ``drift_threshold``.

Entries are keyed by :class:`CacheKey` ``(layer, pattern, shape, branch)``. With
``share_across_layers=True`` the layer is left out of the lookup, so all layers with the same pattern
and shape share one layout (statistics still count per requesting layer).

Hot path: a hit does no device work and no host sync, only a few dictionary look-ups (the key's
canonical text is memoised, so building a fresh :class:`CacheKey` per call, as the engine does, costs
a hash, not a JSON encoding). A build stores the layout's density as a 0-dim tensor computed from the
kept-block counts (a few tiny operations, not a pass over the block mask); densities are reduced only
in :meth:`PatternCache.stats`. Build time is measured with ``time.perf_counter``
without synchronising, so on CUDA it is the host-side (launch) time; pass ``profile=True`` (or
``sync=True`` per call) to synchronise around the build and time the device work too. The drift check
needs one small device-to-host copy per lookup when ``drift_threshold`` is set.

A step counter that goes back (a new generation started without :meth:`PatternCache.clear`) re-anchors
an entry at the current step instead of refreshing it: keeping patterns across prompts of the same
shape is the point. Loaded entries are anchored at the first step they are served.

:meth:`PatternCache.save` / :meth:`PatternCache.load` store layouts, their signatures and metadata in
one safetensors file (written to a temporary name, then renamed), so a pattern searched once serves the
next prompt of the same shape at once.

Example::

    cache = PatternCache(refresh_every=10, drift_threshold=0.1)
    key = CacheKey.for_attention("blocks.3.attn1", "topk0.1", q_len, kv_len, 128, 128, heads)
    layout = cache.get_or_build(key, step, lambda: pattern(q, k), signature=pooled_means)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._atomic import atomic_file
from .block_layout import BlockLayout

__all__ = ["CacheKey", "PatternCache", "FORMAT", "FORMAT_VERSION"]

FORMAT = "dit-sparse/pattern-cache"
FORMAT_VERSION = "1"
_SHARED_LAYER = "*"
_EPS = 1e-12
_MAX_FINGERPRINTS = 4096


@dataclass(frozen=True)
class CacheKey:
    """What a cached layout is for.

    * ``layer``   - the attention module's name (e.g. ``"transformer_blocks.3.attn1"``)
    * ``pattern`` - the pattern's name, carrying its parameters (e.g. ``"topk_r0.1"``)
    * ``shape``   - ``(q_len, kv_len, block_q, block_kv, heads)``, or ``(token_layout, heads)``; any tuple
      of ints, floats, strings, ``None``, nested tuples and objects whose ``repr`` identifies them
      (frozen dataclasses such as ``TokenLayout``). Lists and ``torch.Size`` become tuples.
    * ``branch``  - batch / CFG branch index, or ``None`` when the layout covers the whole batch
    """

    layer: str
    pattern: str
    shape: tuple
    branch: int | None = None

    def __post_init__(self):
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"CacheKey.layer must be a non-empty str (the module name), got {self.layer!r}")
        if self.layer == _SHARED_LAYER:
            raise ValueError(f"CacheKey.layer {_SHARED_LAYER!r} is reserved for layouts shared across layers")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"CacheKey.pattern must be a non-empty str (the pattern name), got {self.pattern!r}")
        if not isinstance(self.shape, (tuple, list, torch.Size)):
            raise ValueError(
                f"CacheKey.shape must be a tuple such as (q_len, kv_len, block_q, block_kv, heads), "
                f"got {type(self.shape).__name__}"
            )
        object.__setattr__(self, "shape", _normalize_shape(self.shape))
        b = self.branch
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise ValueError(f"CacheKey.branch must be None or an int >= 0 (the CFG/batch branch), got {b!r}")

    @classmethod
    def for_attention(
        cls, layer: str, pattern: str, q_len: int, kv_len: int, block_q: int, block_kv: int, heads: int,
        branch: int | None = None,
    ) -> "CacheKey":
        """Key for a layout of ``q_len x kv_len`` tokens in ``block_q x block_kv`` blocks over ``heads`` heads."""
        return cls(layer, pattern, (q_len, kv_len, block_q, block_kv, heads), branch)

    def fingerprint(self, share_across_layers: bool = False) -> str:
        """Canonical JSON text of the key (the lookup key, and what :meth:`PatternCache.save` writes)."""
        layer = _SHARED_LAYER if share_across_layers else self.layer
        return json.dumps([layer, self.pattern, _encode(self.shape), self.branch], separators=(",", ":"))


def _type_tag(shape: tuple) -> tuple:
    """Types of a normalised shape's items (nested): keeps keys that compare equal across types apart
    in the fingerprint memo (``(1,)``, ``(1.0,)`` and ``(True,)`` are equal tuples, not equal keys)."""
    tag = tuple(map(type, shape))
    if tuple in tag:
        return tuple(_type_tag(x) if type(x) is tuple else type(x) for x in shape)
    return tag


_PLAIN = (int, str, float, bool, type(None))


def _normalize_shape(shape) -> tuple:
    out = []
    for item in shape:
        if type(item) in _PLAIN:  # fast path: exactly a builtin scalar, kept as is
            out.append(item)
        elif isinstance(item, (tuple, list, torch.Size)):
            out.append(_normalize_shape(item))
        elif isinstance(item, (bool, str, float)) or item is None:
            out.append(item)
        elif hasattr(item, "__index__"):  # numpy / torch integer scalars compare and print as ints
            out.append(int(item.__index__()))
        else:
            out.append(item)
    return tuple(out)


def _encode(value):
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    cls = type(value)
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "repr": repr(value)}


@dataclass
class _Build:
    """One built layout's density (0-dim tensor on the layout's device) and serve counts per layer."""

    density: torch.Tensor
    serves: dict = field(default_factory=dict)


@dataclass
class _Entry:
    layout: BlockLayout
    built_step: int | None
    signature: torch.Tensor | None
    build: _Build


@dataclass
class _LayerStats:
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    drift_refreshes: int = 0
    build_time_s: float = 0.0


class PatternCache:
    """Cache of block layouts keyed by :class:`CacheKey` (see the module docstring for the rules).

    Args:
        refresh_every: rebuild a layout once ``step - built_step >= refresh_every`` (int >= 1);
            ``None`` never refreshes on the step count.
        drift_threshold: rebuild when the relative L2 change of the signature since the build exceeds
            this (float >= 0); ``None`` disables the drift check.
        share_across_layers: one layout per (pattern, shape, branch) for all layers.
        profile: synchronise the device around each build so the build time includes device work.
        max_signature_numel: largest signature accepted; signatures are meant to be small (pooled).
    """

    def __init__(
        self,
        refresh_every: int | None = None,
        drift_threshold: float | None = None,
        share_across_layers: bool = False,
        profile: bool = False,
        max_signature_numel: int = 1 << 16,
    ):
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1
        ):
            raise ValueError(f"refresh_every must be None or an int >= 1 (steps), got {refresh_every!r}")
        if drift_threshold is not None:
            if isinstance(drift_threshold, bool) or not isinstance(drift_threshold, (int, float)):
                raise ValueError(f"drift_threshold must be None or a float >= 0, got {drift_threshold!r}")
            if not (drift_threshold >= 0 and math.isfinite(drift_threshold)):
                raise ValueError(
                    f"drift_threshold must be a finite float >= 0 (relative L2 change), got {drift_threshold!r}"
                )
            drift_threshold = float(drift_threshold)
        if not isinstance(max_signature_numel, int) or max_signature_numel < 1:
            raise ValueError(f"max_signature_numel must be an int >= 1, got {max_signature_numel!r}")
        self.refresh_every = refresh_every
        self.drift_threshold = drift_threshold
        self.share_across_layers = bool(share_across_layers)
        self.profile = bool(profile)
        self.max_signature_numel = max_signature_numel
        self._entries: dict[str, _Entry] = {}
        self._layers: dict[str, _LayerStats] = {}
        self._builds: list[_Build] = []
        self._fingerprints: dict[tuple, str] = {}  # (key, sharing, its type tag) -> fingerprint

    def _fingerprint(self, key: CacheKey) -> str:
        """``key.fingerprint(share_across_layers)``, memoised: a hash look-up instead of a JSON encoding
        on every call (keys are frozen; objects in shapes must have equal reprs when they are equal)."""
        try:
            memo = (key, self.share_across_layers, _type_tag(key.shape))
            fp = self._fingerprints.get(memo)
        except TypeError:  # an unhashable item in the shape: no memo
            return key.fingerprint(self.share_across_layers)
        if fp is None:
            fp = key.fingerprint(self.share_across_layers)
            if len(self._fingerprints) >= _MAX_FINGERPRINTS:
                self._fingerprints.clear()
            self._fingerprints[memo] = fp
        return fp

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return self._fingerprint(key) in self._entries

    def get_or_build(
        self,
        key: CacheKey,
        step: int,
        build_fn: Callable[[], BlockLayout],
        signature: torch.Tensor | None = None,
        sync: bool | None = None,
    ) -> BlockLayout:
        """Return the cached layout for ``key`` if still valid at ``step``, else ``build_fn()`` (stored).

        Args:
            key: what the layout is for.
            step: denoising step index (int >= 0).
            build_fn: builds the layout; called only on a miss or a refresh.
            signature: small tensor summarising the inputs (e.g. pooled Q/K block means, any shape);
                compared with the one stored at build time when ``drift_threshold`` is set. A change of
                shape counts as drift. Without a signature no drift check is made.
            sync: synchronise the device around the build for timing; default ``self.profile``.
        """
        if not isinstance(key, CacheKey):
            raise ValueError(f"key must be a CacheKey, got {type(key).__name__}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (the denoising step index), got {step!r}")
        if signature is not None:
            if not isinstance(signature, torch.Tensor):
                raise ValueError(f"signature must be a tensor or None, got {type(signature).__name__}")
            if signature.numel() > self.max_signature_numel:
                raise ValueError(
                    f"signature has {signature.numel()} elements, more than max_signature_numel="
                    f"{self.max_signature_numel}; pass a pooled summary (e.g. block means) instead"
                )
        stats = self._layers.get(key.layer)
        if stats is None:
            stats = self._layers[key.layer] = _LayerStats()
        fp = self._fingerprint(key)
        entry = self._entries.get(fp)
        reason = None
        if entry is None:
            reason = "miss"
        else:
            if entry.built_step is None or step < entry.built_step:
                entry.built_step = step  # loaded entry, or a new generation: anchor here
            if self.refresh_every is not None and step - entry.built_step >= self.refresh_every:
                reason = "refresh"
            elif self.drift_threshold is not None and self._drifted(entry.signature, signature):
                reason = "drift"
        if reason is None:  # hit: counters only, no tensor work
            stats.hits += 1
            self._count_serve(entry.build, key.layer)
            return entry.layout

        layout, seconds = self._timed_build(build_fn, self.profile if sync is None else sync)
        stats.build_time_s += seconds
        if reason == "miss":
            stats.misses += 1
        elif reason == "refresh":
            stats.refreshes += 1
        else:
            stats.drift_refreshes += 1
        build = _Build(_mean_density(layout))
        self._builds.append(build)
        sig = None if signature is None else signature.detach().clone()
        self._entries[fp] = _Entry(layout, step, sig, build)
        self._count_serve(build, key.layer)
        return layout

    def _drifted(self, old: torch.Tensor | None, new: torch.Tensor | None) -> bool:
        if self.drift_threshold is None or old is None or new is None:
            return False
        if old.shape != new.shape:
            return True
        new32 = new.detach().float()
        old32 = old.to(device=new32.device, dtype=torch.float32)
        rel = torch.linalg.vector_norm(new32 - old32) / torch.linalg.vector_norm(old32).clamp_min(_EPS)
        return bool(rel > self.drift_threshold)

    @staticmethod
    def _timed_build(build_fn, sync: bool) -> tuple[BlockLayout, float]:
        cuda = sync and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        start = perf_counter()
        layout = build_fn()
        if not isinstance(layout, BlockLayout):
            raise ValueError(f"build_fn must return a BlockLayout, got {type(layout).__name__}")
        if cuda and layout.device.type == "cuda":
            torch.cuda.synchronize(layout.device)
        return layout, perf_counter() - start

    @staticmethod
    def _count_serve(build: _Build, layer: str) -> None:
        build.serves[layer] = build.serves.get(layer, 0) + 1

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Counters as plain Python numbers (this is where densities are reduced, with one host copy).

        Keys: ``lookups, hits, misses, refreshes, drift_refreshes, builds, hit_rate, build_time_s,
        mean_density, entries`` and ``layers`` (the same counters per requesting layer, no ``entries``).
        ``mean_density`` is the mean over served layouts (weighted by how often each was served) of the
        fraction of token pairs kept; NaN when nothing was served. ``builds = misses + refreshes +
        drift_refreshes``.
        """
        densities = self._densities()
        layers = {name: self._layer_dict(name, s, densities) for name, s in self._layers.items()}
        total = _LayerStats()
        for s in self._layers.values():
            total.hits += s.hits
            total.misses += s.misses
            total.refreshes += s.refreshes
            total.drift_refreshes += s.drift_refreshes
            total.build_time_s += s.build_time_s
        out = self._layer_dict(None, total, densities)
        out["entries"] = len(self._entries)
        out["layers"] = layers
        return out

    def _densities(self) -> list[float]:
        if not self._builds:
            return []
        return torch.stack([b.density.detach().float().cpu() for b in self._builds]).tolist()

    def _layer_dict(self, layer: str | None, s: _LayerStats, densities: list[float]) -> dict[str, Any]:
        served = weighted = 0.0
        for b, d in zip(self._builds, densities):
            n = sum(b.serves.values()) if layer is None else b.serves.get(layer, 0)
            served += n
            weighted += n * d
        lookups = s.hits + s.misses + s.refreshes + s.drift_refreshes
        return {
            "lookups": lookups,
            "hits": s.hits,
            "misses": s.misses,
            "refreshes": s.refreshes,
            "drift_refreshes": s.drift_refreshes,
            "builds": lookups - s.hits,
            "hit_rate": s.hits / lookups if lookups else 0.0,
            "build_time_s": s.build_time_s,
            "mean_density": weighted / served if served else float("nan"),
        }

    def reset_stats(self) -> None:
        """Zero all counters; cached layouts stay."""
        self._layers = {}
        live = {id(e.build): e.build for e in self._entries.values()}
        for b in live.values():
            b.serves = {}
        self._builds = list(live.values())

    def clear(self) -> None:
        """Drop every cached layout (counters stay; see :meth:`reset_stats`)."""
        self._entries = {}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write all layouts, signatures and metadata to one safetensors file, atomically.

        The file is written to a temporary name in the same folder and renamed over ``path``, so a
        failed save leaves neither a partial file nor a changed old one.
        """
        path = os.fspath(path)
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for i, (fp, e) in enumerate(self._entries.items()):
            lay = e.layout
            tensors[f"{i}.kv_counts"] = _to_saveable(lay.kv_counts)
            tensors[f"{i}.kv_indices"] = _to_saveable(lay.kv_indices)
            if e.signature is not None:
                tensors[f"{i}.signature"] = _to_saveable(e.signature)
            entries.append({
                "key": fp, "q_len": lay.q_len, "kv_len": lay.kv_len, "block_q": lay.block_q,
                "block_kv": lay.block_kv, "signature": e.signature is not None,
            })
        config = {
            "refresh_every": self.refresh_every,
            "drift_threshold": self.drift_threshold,
            "share_across_layers": self.share_across_layers,
        }
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": json.dumps(config),
            "entries": json.dumps(entries),
        }
        with atomic_file(path, parents=False) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> "PatternCache":
        """A cache holding the layouts saved in ``path``, on ``device``, ready to serve.

        The saved ``refresh_every`` / ``drift_threshold`` / ``share_across_layers`` are used unless given
        in ``overrides`` (which also takes ``profile`` and ``max_signature_numel``). Loaded entries are
        anchored at the first step they are served. Raises ``ValueError`` for a file that is not a
        dit-sparse pattern cache of this format version.
        """
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                _check_format(meta, path)
                try:
                    config = json.loads(meta["config"])
                    entries = json.loads(meta["entries"])
                    saved_share = bool(config["share_across_layers"])
                    records = [
                        (
                            item["key"],
                            f.get_tensor(f"{i}.kv_counts"),
                            f.get_tensor(f"{i}.kv_indices"),
                            (int(item["q_len"]), int(item["kv_len"]), int(item["block_q"]), int(item["block_kv"])),
                            f.get_tensor(f"{i}.signature") if item["signature"] else None,
                        )
                        for i, item in enumerate(entries)
                    ]
                except (KeyError, TypeError, ValueError, SafetensorError) as err:
                    raise ValueError(
                        f"{path} is a damaged dit-sparse pattern cache ({type(err).__name__}: {err}); "
                        f"delete it and save it again"
                    ) from err
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a safetensors file ({err}); pass a file written by PatternCache.save"
            ) from err
        if bool(overrides.get("share_across_layers", saved_share)) != saved_share:
            raise ValueError(
                f"{path} was saved with share_across_layers={saved_share}; load it with "
                f"the same setting (keys of shared and per-layer caches differ)"
            )
        cache = cls(**{**config, **overrides})
        for key, counts, indices, sizes, sig in records:
            layout = BlockLayout(counts.to(device), indices.to(device), *sizes)
            build = _Build(_mean_density(layout))
            cache._builds.append(build)
            cache._entries[key] = _Entry(layout, None, None if sig is None else sig.to(device), build)
        return cache


def _mean_density(layout: BlockLayout) -> torch.Tensor:
    """``layout.density().mean()`` (0-dim fp32, on the layout's device), recorded for every build: one
    launch where Triton runs (``kernels/block_sparse/layout_density.py``), else :func:`mean_density_torch`."""
    from .kernels.block_score.api import _use_triton

    if _use_triton(layout.kv_counts, "auto"):
        from .kernels.block_sparse.layout_density import mean_density_triton

        return mean_density_triton(layout)
    return mean_density_torch(layout)


def mean_density_torch(layout: BlockLayout) -> torch.Tensor:
    """``layout.density().mean()`` (0-dim fp32, on the layout's device) from the kept-block counts.

    Every kept key block has ``block_kv`` tokens except the tail block, which is kept by a row iff the
    row's last listed index is ``Mk - 1`` (indices are ascending); query rows weigh their block's true
    size likewise. A few operations on ``[B, H, Mq]`` tensors, no pass over the ``[B, H, Mq, Mk]`` mask
    and no host sync.
    """
    counts = layout.kv_counts.long()
    mq, mk = layout.num_q_blocks, layout.num_kv_blocks
    bq, bk = layout.block_q, layout.block_kv
    cols = counts * bk  # key tokens kept per query block if every block were full (int64: exact)
    tail_k = layout.kv_len - bk * (mk - 1)
    if tail_k != bk:
        last = layout.kv_indices.gather(-1, (counts - 1).clamp_(min=0).unsqueeze(-1)).squeeze(-1)
        cols = cols - ((counts > 0) & (last == mk - 1)) * (bk - tail_k)
    kept = cols.sum() * bq
    tail_q = layout.q_len - bq * (mq - 1)
    if tail_q != bq:
        kept = kept - cols[..., -1].sum() * (bq - tail_q)
    pairs = float(layout.batch * layout.heads * layout.q_len * layout.kv_len)
    return kept.float() / pairs


def _to_saveable(t: torch.Tensor) -> torch.Tensor:
    # contiguous + clone: expanded (stride-0) views and tensors shared between entries save separately.
    return t.detach().to("cpu").contiguous().clone()


def _check_format(meta: dict, path: str) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a dit-sparse pattern cache (format {meta.get('format')!r}, expected {FORMAT!r}); "
            f"pass a file written by PatternCache.save"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is pattern-cache format version {meta.get('version')!r} but this dit-sparse reads "
            f"version {FORMAT_VERSION!r}; delete the file and let the cache rebuild it"
        )
