"""Step-cached attention: keep what a reuse step needs from the last computing step.

A :class:`~dit_sparse.schedule.StepSchedule` can mark steps where a layer's attention is reused.
:class:`StepCache` holds, per ``(layer, branch)``, one tensor:

* ``"output"`` mode - the attention output of the last computing step. A reuse step returns it as is
  and computes **no attention at all** (cheapest, least exact).
* ``"residual"`` mode - ``r = dense_out - sparse_out`` from the last step where both were computed
  (the schedule makes that step dense and sets ``store_residual``). A reuse step computes only the
  cheap **sparse** output and returns ``sparse_out + r``, so it keeps the sparse pattern's own
  dependence on the current input and corrects what the pattern drops.

Memory: one attention-output-sized tensor (``[B, S, H*D]`` or whatever shape the caller stores, in
its dtype) per (layer, branch) that stored one, kept until overwritten or :meth:`StepCache.reset`;
e.g. 30 layers x 2 CFG branches x 75,600 tokens x 1,536 channels x 2 bytes = 14 GB for a 720p
Wan 1.3B video. Kept tensors are stored by reference (no copy): do not modify an output in place
after storing it.

Call :meth:`StepCache.reset` between generations. Each stored tensor also records its step, and a
reuse at a step not after it raises, so a cache left over from a previous generation is caught.

:meth:`StepCache.run` applies a :class:`~dit_sparse.schedule.Decision` given two callables::

    out = step_cache.run(decision, (layer, branch), step, dense_fn=lambda: sdpa(q, k, v),
                         sparse_fn=lambda: block_sparse_attention(q, k, v, layout))
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from .schedule import REUSE_MODES, Decision

__all__ = ["StepCache"]


class StepCache:
    """Per ``(layer, branch)`` store for step-cached attention (see the module docstring).

    Args:
        mode: ``"output"`` or ``"residual"``; must match the schedule's ``reuse_mode``.
    """

    def __init__(self, mode: str = "residual"):
        if mode not in REUSE_MODES:
            raise ValueError(f"StepCache mode must be one of {REUSE_MODES}, got {mode!r}")
        self.mode = mode
        self._store: dict[Hashable, tuple[torch.Tensor, int | None]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def reset(self) -> None:
        """Drop everything kept (call between generations)."""
        self._store.clear()

    def memory_bytes(self) -> int:
        """Bytes held by the kept tensors."""
        return sum(t.numel() * t.element_size() for t, _ in self._store.values())

    # ------------------------------------------------------------------ store
    def store_output(self, key: Hashable, output: torch.Tensor, step: int | None = None) -> None:
        """Keep ``output`` (any shape) of ``key = (layer, branch)`` for "output"-mode reuse."""
        self._require("output", "store_output")
        self._store[key] = (output.detach(), step)

    def store_residual(
        self, key: Hashable, dense_out: torch.Tensor, sparse_out: torch.Tensor, step: int | None = None
    ) -> None:
        """Keep ``dense_out - sparse_out`` (same shape) of ``key`` for "residual"-mode reuse."""
        self._require("residual", "store_residual")
        if dense_out.shape != sparse_out.shape:
            raise ValueError(
                f"dense output {tuple(dense_out.shape)} and sparse output {tuple(sparse_out.shape)} differ in "
                f"shape; pass the two outputs of the same attention call"
            )
        self._store[key] = ((dense_out.detach() - sparse_out.detach()), step)

    # ------------------------------------------------------------------ reuse
    def reuse(self, key: Hashable, sparse_out: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
        """The reused output of ``key``: the kept output ("output"), or ``sparse_out + residual``."""
        kept = self._kept(key, step)
        if self.mode == "output":
            if sparse_out is not None:
                raise ValueError("'output' mode reuses the kept output as is; do not compute a sparse output")
            return kept
        if sparse_out is None:
            raise ValueError("'residual' mode needs this step's sparse output: reuse(key, sparse_out)")
        if sparse_out.shape != kept.shape:
            raise ValueError(
                f"sparse output {tuple(sparse_out.shape)} does not match the kept residual {tuple(kept.shape)} "
                f"of {key!r}; the shapes changed between steps - call reset()"
            )
        return sparse_out + kept.to(sparse_out.dtype)

    def _kept(self, key: Hashable, step: int | None) -> torch.Tensor:
        got = self._store.get(key)
        if got is None:
            raise RuntimeError(
                f"nothing kept for {key!r}: the step before a reuse step must store its "
                f"{self.mode} (follow Decision.store_output / store_residual)"
            )
        tensor, stored = got
        if step is not None and stored is not None and step <= stored:
            raise RuntimeError(
                f"reuse at step {step} of {key!r} but its {self.mode} was kept at step {stored}: a previous "
                f"generation's cache; call StepCache.reset() between generations"
            )
        return tensor

    def _require(self, mode: str, what: str) -> None:
        if self.mode != mode:
            raise ValueError(f"{what} is for '{mode}' mode but this StepCache is in '{self.mode}' mode")

    # ------------------------------------------------------------------ one call
    def run(
        self,
        decision: Decision,
        key: Hashable,
        step: int | None,
        dense_fn: Callable[[], torch.Tensor],
        sparse_fn: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Carry out ``decision`` for ``key``: compute with ``dense_fn`` / ``sparse_fn`` and keep or reuse.

        "output"-mode reuse calls neither function; "residual"-mode reuse calls only ``sparse_fn``.
        """
        if decision.mode == "reuse":
            if decision.reuse_mode != self.mode:
                raise ValueError(
                    f"decision reuses in '{decision.reuse_mode}' mode but this StepCache is in '{self.mode}' "
                    f"mode; build both from the same reuse_mode"
                )
            if self.mode == "output":
                return self.reuse(key, step=step)
            return self.reuse(key, sparse_fn(), step=step)
        if decision.mode == "dense":
            out = dense_fn()
        elif decision.mode == "sparse":
            out = sparse_fn()
        else:
            raise ValueError(f"unknown decision mode {decision.mode!r}; expected dense, sparse or reuse")
        if decision.store_residual:
            if decision.mode != "dense":
                raise ValueError("store_residual needs a dense decision (the residual is dense - sparse)")
            self.store_residual(key, out, sparse_fn(), step)
        if decision.store_output:
            self.store_output(key, out, step)
        return out
