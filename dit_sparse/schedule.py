"""Step schedule: per denoising step and layer, compute attention dense, sparse, or reuse it.

Early denoising steps lay out the global structure and suffer most from sparse attention, so
:class:`StepSchedule` runs the first steps dense (``dense_steps``: a fraction of ``num_steps`` or a
count), then sparse. Some layers (often the first and last) can stay dense throughout
(``dense_layers``, or name the sparse ones with ``sparse_layers``). After the dense phase, steps may be
marked as *reuse* steps (``reuse_every=k``: compute on every k-th step and reuse in between, counting
from the first step after the dense phase; or an explicit ``reuse_steps`` set).

:meth:`StepSchedule.decide` returns a :class:`Decision`. What the caller does with it
(:class:`dit_sparse.step_cache.StepCache` implements this):

==========  ==================================================================================
mode        the caller
==========  ==================================================================================
dense       computes dense attention. If ``store_residual``: also the sparse output, and keeps
            ``dense - sparse``. If ``store_output``: keeps the output.
sparse      computes sparse attention; keeps the output if ``store_output``.
reuse       ``reuse_mode="output"``: returns the kept output, computing no attention at all.
            ``reuse_mode="residual"``: computes the sparse output and adds the kept residual.
==========  ==================================================================================

The store flags are set exactly on the computing step right before a run of reuse steps, so nothing
is kept when no reuse follows. In ``"residual"`` mode that step is always dense (the residual needs
the dense output); with ``reuse_every=k`` this makes every k-th step after the dense phase a dense
refresh and the steps in between sparse + residual.

Number of dense steps for a fraction ``f``: ``ceil(f * num_steps)`` (the fewest steps covering at
least that fraction; a product within 1e-9 of an integer counts as that integer, so ``0.1 * 30`` is 3).
An int count larger than ``num_steps`` makes every step dense.

:class:`StepState` tracks the step index from the timesteps a hook sees: it advances on each new
timestep, and counts calls with the same timestep (CFG branches run as separate forwards) as branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

__all__ = ["Decision", "StepSchedule", "StepState", "MODES", "REUSE_MODES"]

MODES = ("dense", "sparse", "reuse")
REUSE_MODES = ("output", "residual")
_FIELDS = (
    "dense_steps", "num_steps", "dense_layers", "sparse_layers", "reuse_steps", "reuse_every", "reuse_mode",
    "num_layers",
)


@dataclass(frozen=True)
class Decision:
    """What to do for one (step, layer).

    * ``mode``           - ``"dense"``, ``"sparse"`` or ``"reuse"``
    * ``reuse_mode``     - for ``"reuse"``: ``"output"`` or ``"residual"``; else ``None``
    * ``store_output``   - keep this step's attention output (a reuse step in "output" mode follows)
    * ``store_residual`` - also compute the sparse output and keep ``dense - sparse`` (a reuse step in
      "residual" mode follows; only with mode ``"dense"``)
    """

    mode: str
    reuse_mode: str | None = None
    store_output: bool = False
    store_residual: bool = False


_DENSE = Decision("dense")
_SPARSE = Decision("sparse")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _index_tuple(name: str, values, allow_none: bool) -> tuple | None:
    if values is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a sequence of ints, got None")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of ints (negative counts from the end), got {values!r}")
    values = tuple(values)
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise ValueError(f"{name} must hold ints (negative counts from the end), got {bad!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists an index twice: {values!r}")
    return values


def _resolve(name: str, values: tuple, size: int | None, what: str, size_name: str) -> frozenset:
    out = set()
    for v in values:
        if v < 0:
            if size is None:
                raise ValueError(
                    f"{name} has the negative index {v} (counted from the end); pass {size_name} so it "
                    f"can be resolved"
                )
            r = v + size
        else:
            r = v
        if size is not None and not 0 <= r < size:
            raise ValueError(f"{name} index {v} is out of range for {size} {what}")
        out.add(r)
    return frozenset(out)


@dataclass(frozen=True)
class StepSchedule:
    """Which steps and layers run dense, sparse, or reuse an earlier output (see the module docstring).

    Args:
        dense_steps: float in [0, 1] = fraction of ``num_steps``; int >= 0 = number of steps.
        num_steps: total denoising steps (may also be given to :meth:`decide`); needed for a nonzero
            fraction and for negative ``reuse_steps``.
        dense_layers: layers always dense; negative indices count from the end (need ``num_layers``).
        sparse_layers: if given, only these layers go sparse, the others stay dense.
        reuse_steps: explicit steps whose attention is reused (negative = from the end).
        reuse_every: int k >= 1: after the dense phase compute on every k-th step, reuse in between
            (k = 1 never reuses). Exclusive with ``reuse_steps``.
        reuse_mode: ``"output"`` or ``"residual"``.
        num_layers: number of attention layers (may also be given to :meth:`decide`).
    """

    dense_steps: int | float = 0.2
    num_steps: int | None = None
    dense_layers: tuple = ()
    sparse_layers: tuple | None = None
    reuse_steps: tuple | None = None
    reuse_every: int | None = None
    reuse_mode: str = "residual"
    num_layers: int | None = None
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        d = self.dense_steps
        if _is_int(d):
            if d < 0:
                raise ValueError(f"dense_steps as a count must be >= 0, got {d}")
        elif isinstance(d, float):
            if not 0.0 <= d <= 1.0:
                raise ValueError(
                    f"dense_steps as a fraction must be in [0, 1], got {d}; pass an int for a number of steps"
                )
        else:
            raise ValueError(f"dense_steps must be a float fraction in [0, 1] or an int count, got {d!r}")
        for name in ("num_steps", "num_layers"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 - frozen dataclass
        set_("dense_layers", _index_tuple("dense_layers", self.dense_layers, allow_none=False))
        set_("sparse_layers", _index_tuple("sparse_layers", self.sparse_layers, allow_none=True))
        if self.reuse_steps is not None:
            set_("reuse_steps", tuple(sorted(_index_tuple("reuse_steps", self.reuse_steps, allow_none=False))))
        e = self.reuse_every
        if e is not None and (not _is_int(e) or e < 1):
            raise ValueError(f"reuse_every must be None or an int >= 1 (compute every k-th step), got {e!r}")
        if e is not None and self.reuse_steps is not None:
            raise ValueError("give reuse_every or reuse_steps, not both")
        if self.reuse_mode not in REUSE_MODES:
            raise ValueError(f"reuse_mode must be one of {REUSE_MODES}, got {self.reuse_mode!r}")
        overlap = set(self.dense_layers) & set(self.sparse_layers or ())
        if overlap:
            raise ValueError(f"layers {sorted(overlap)} are in both dense_layers and sparse_layers; pick one")
        # Validate what can be validated now (the rest on the first decide()).
        needs_steps = (isinstance(d, float) and d > 0) or any(s < 0 for s in self.reuse_steps or ())
        if self.num_steps is not None or not needs_steps:
            self._plan(self.num_steps)
        if self.num_layers is not None:
            self._dense_layer_set(self.num_layers)

    # ------------------------------------------------------------------ planning
    def dense_step_count(self, num_steps: int | None = None) -> int:
        """Number of steps in the dense phase (steps ``0 .. count-1``)."""
        n = self._num_steps(num_steps)
        d = self.dense_steps
        if _is_int(d):
            return d if n is None else min(d, n)
        if d == 0.0:
            return 0
        if n is None:
            raise ValueError(f"dense_steps={d} is a fraction; pass num_steps (here or to StepSchedule)")
        x = d * n
        return min(n, round(x) if abs(x - round(x)) < 1e-9 else math.ceil(x))

    def _num_steps(self, num_steps: int | None) -> int | None:
        if num_steps is None:
            return self.num_steps
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        return num_steps

    def _plan(self, num_steps: int | None) -> tuple[int, frozenset | None]:
        """(dense count, resolved explicit reuse steps or None), validated; cached per num_steps."""
        plan = self._plans.get(num_steps)
        if plan is not None:
            return plan
        dense = self.dense_step_count(num_steps)
        reuse = None
        if self.reuse_steps is not None:
            reuse = _resolve("reuse_steps", self.reuse_steps, num_steps, "steps", "num_steps")
            early = sorted(s for s in reuse if s < dense)
            if early:
                raise ValueError(
                    f"reuse_steps {early} fall in the dense phase (steps 0..{dense - 1}); reuse only after it"
                )
            if 0 in reuse:
                raise ValueError("step 0 cannot reuse attention: nothing was computed before it")
        plan = (dense, reuse)
        self._plans[num_steps] = plan
        return plan

    def _dense_layer_set(self, num_layers: int | None) -> tuple[frozenset, frozenset | None]:
        key = ("layers", num_layers)
        got = self._plans.get(key)
        if got is not None:
            return got
        dense = _resolve("dense_layers", self.dense_layers, num_layers, "layers", "num_layers")
        sparse = None
        if self.sparse_layers is not None:
            sparse = _resolve("sparse_layers", self.sparse_layers, num_layers, "layers", "num_layers")
            both = dense & sparse
            if both:
                raise ValueError(f"layers {sorted(both)} are in both dense_layers and sparse_layers; pick one")
        self._plans[key] = (dense, sparse)
        return dense, sparse

    def _is_reuse(self, step: int, dense: int, reuse: frozenset | None) -> bool:
        if step < dense:
            return False
        if reuse is not None:
            return step in reuse
        k = self.reuse_every
        return k is not None and (step - dense) % k != 0

    # ------------------------------------------------------------------ decisions
    def decide(
        self, step: int, layer_index: int, num_steps: int | None = None, num_layers: int | None = None
    ) -> Decision:
        """The :class:`Decision` for denoising step ``step`` (0-based) of layer ``layer_index`` (0-based)."""
        n = self._num_steps(num_steps)
        if num_layers is None:
            num_layers = self.num_layers
        elif not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if n is not None and step >= n:
            raise ValueError(f"step {step} is out of range for num_steps={n} (steps are 0-based)")
        if not _is_int(layer_index) or layer_index < 0:
            raise ValueError(f"layer_index must be an int >= 0 (0-based), got {layer_index!r}")
        if num_layers is not None and layer_index >= num_layers:
            raise ValueError(f"layer_index {layer_index} is out of range for num_layers={num_layers}")

        dense_layers, sparse_layers = self._dense_layer_set(num_layers)
        if layer_index in dense_layers or (sparse_layers is not None and layer_index not in sparse_layers):
            return _DENSE
        dense, reuse = self._plan(n)
        if self._is_reuse(step, dense, reuse):
            return Decision("reuse", reuse_mode=self.reuse_mode)
        next_reuse = (n is None or step + 1 < n) and self._is_reuse(step + 1, dense, reuse)
        if self.reuse_mode == "residual":
            return Decision("dense", store_residual=True) if next_reuse else (_DENSE if step < dense else _SPARSE)
        mode = "dense" if step < dense else "sparse"
        return Decision(mode, store_output=True) if next_reuse else Decision(mode)

    def table(self, num_steps: int, num_layers: int) -> list[list[str]]:
        """``[num_steps][num_layers]`` grid of modes, for inspection and plots."""
        return [
            [self.decide(s, layer, num_steps, num_layers).mode for layer in range(num_layers)]
            for s in range(num_steps)
        ]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict; :meth:`from_dict` rebuilds an equal schedule."""
        out = {}
        for name in _FIELDS:
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepSchedule":
        if not isinstance(data, dict):
            raise ValueError(f"StepSchedule.from_dict needs a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown StepSchedule fields {unknown}; known: {list(_FIELDS)}")
        return cls(**data)


class StepState:
    """Mutable denoising position, advanced by a hook on every transformer forward.

    * ``step``      - 0-based index of the current distinct timestep
    * ``timestep``  - the last timestep seen (as given), ``None`` before the first forward
    * ``num_steps`` - total steps when the caller knows it (kept by :meth:`reset`)
    * ``branch``    - 0 on the first forward of a timestep, 1 on the second (e.g. the unconditional
      CFG pass run as its own forward), ...

    Timesteps are compared by value. A tensor timestep costs one small device-to-host copy per
    transformer forward (not per attention layer); a timestep of more than 64 elements (per-token
    timesteps) is compared by a fingerprint (size, sum, min, max, first element).
    """

    def __init__(self, num_steps: int | None = None):
        if num_steps is not None and (not _is_int(num_steps) or num_steps < 1):
            raise ValueError(f"num_steps must be None or an int >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        """Back to before the first forward (call between generations); ``num_steps`` is kept."""
        self.step = 0
        self.timestep = None
        self.branch = 0
        self._key = None

    def advance(self, timestep) -> int:
        """Record one transformer forward at ``timestep``; returns the step index."""
        key = _timestep_key(timestep)
        if self._key is None:
            self.step, self.branch = 0, 0
        elif key != self._key:
            self.step += 1
            self.branch = 0
        else:
            self.branch += 1
        self._key = key
        self.timestep = timestep
        return self.step

    def __repr__(self) -> str:
        return (
            f"StepState(step={self.step}, timestep={self.timestep!r}, num_steps={self.num_steps}, "
            f"branch={self.branch})"
        )


def _timestep_key(t) -> tuple:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.numel() == 0:
            raise ValueError("timestep tensor is empty; pass the step's timestep")
        if t.numel() <= 64:
            return tuple(t.flatten().double().tolist())
        f = t.flatten().double()
        return (f.numel(),) + tuple(torch.stack([f.sum(), f.min(), f.max(), f[0]]).tolist())
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        try:
            return tuple(float(x) for x in t)
        except TypeError:
            raise ValueError(f"timestep must be a number, a sequence of numbers or a tensor, got {t!r}") from None
    return (float(t),)
