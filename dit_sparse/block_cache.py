"""Block-level step caching: on reuse steps, skip whole transformer blocks and add back their residual.

Consecutive denoising steps change a block's *residual* (its output minus its input) slowly (FORA,
https://arxiv.org/abs/2407.01425; Delta-DiT, https://arxiv.org/abs/2406.01125). With
``SparseAttentionConfig(reuse_scope="block", reuse_every=k)`` every transformer block of the model
(self-attention, cross-attention and feed-forward together) gets a hook
(:class:`~dit_sparse.block_hooks.BlockReuseHook`, registered through diffusers' ``HookRegistry``), and
after the dense warm-up:

* a **computing** step runs the block; on the computing step right before a run of reuse steps it
  keeps ``output - input`` for the hidden states and, in joint-attention blocks (CogVideoX,
  HunyuanVideo, Mochi, Flux), for the text stream (``encoder_hidden_states``);
* a **reuse** step does not run the block at all and returns ``input + kept residual`` (per stream,
  in the block's own output structure).

The steps come from the same :class:`~dit_sparse.schedule.StepSchedule` rule as attention reuse
(compute every ``reuse_every``-th step after the dense warm-up, reuse in between). Blocks listed in
``always_compute_blocks`` (default: the first and the last) compute on every step. Residuals are kept
per ``(block, CFG branch)``: separate cond / uncond forwards never mix residuals, a batched CFG forward
keeps one residual for its whole batch.

A reuse step whose residual is missing or does not fit (a CFG branch that did not run on the
computing step, a changed shape) computes the block instead, counts it as ``fallback`` and keeps its
residual for the following reuse steps. Residuals are dropped between generations
(:meth:`BlockCache.reset`, called by the engine's ``reset_generation``).

Memory: one residual per stream, block and branch, in the block's output dtype, kept from the
computing step before a reuse run until it is replaced; e.g. Wan 1.3B at 480p / 81 frames: at most 30
blocks x 32,760 tokens x 1,536 channels x 2 bytes = 3.0 GB per CFG branch.

This module holds the state: :class:`BlockCache` (the block schedule, the kept residuals, the
counters; one per engine) and :class:`BlockInfo` (what a hook knows about its block).
``dit_sparse/block_hooks.py`` holds the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import Decision, StepSchedule

__all__ = ["BlockInfo", "BlockCache", "KeptResiduals"]


@dataclass(frozen=True)
class BlockInfo:
    """One hooked transformer block.

    * ``index`` / ``count``: position in execution order over all block lists, and the number of blocks
    * ``name``: module path (with the transformer prefix of a second expert, e.g. ``transformer_2.``)
    * ``always_compute``: listed in ``always_compute_blocks``: never reused
    * ``hidden_index`` / ``encoder_index``: positions of the two streams in a tuple output
      (``encoder_index`` ``None``: the block returns the hidden states tensor alone)
    * ``hidden_arg`` / ``encoder_arg``: the forward's argument names of the two streams
    * ``attention_layers``: self-attention layers of the engine inside the block (skipped with it)
    """

    index: int
    name: str
    count: int
    always_compute: bool
    hidden_index: int
    encoder_index: int | None
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"
    attention_layers: int = 0


@dataclass
class KeptResiduals:
    """What one block keeps for one branch: residuals ``(hidden, encoder or None)``, the block's output
    tuple length (``None``: it returns a tensor) and the step they were computed on."""

    residuals: tuple  # (hidden residual, encoder residual or None)
    arity: int | None  # length of the block's tuple output; None = a plain tensor
    step: int


class BlockCache:
    """Per ``(block name, branch)`` residuals, the block schedule and the counters.

    Args:
        dense_steps: the config's dense warm-up (fraction or count); no block is reused during it.
        reuse_every: compute every ``reuse_every``-th step after the warm-up, reuse in between
            (``None`` or 1: never reuse).
    """

    def __init__(self, dense_steps: float | int, reuse_every: int | None):
        self.schedule = StepSchedule(dense_steps=dense_steps, reuse_every=reuse_every, reuse_mode="output")
        self._store: dict[tuple[str, int], KeptResiduals] = {}
        self._generation = 0
        self.reset_stats()

    def decide(self, step: int, num_steps: int | None) -> Decision:
        """``mode == "reuse"``: skip the blocks; ``store_output``: keep residuals on this computing step."""
        return self.schedule.decide(step, 0, num_steps=num_steps)

    # ------------------------------------------------------------------ store
    def store(self, key: tuple[str, int], residuals: tuple, arity: int | None, step: int) -> None:
        self._store[key] = KeptResiduals(tuple(None if r is None else r.detach() for r in residuals), arity, step)

    def lookup(self, key: tuple[str, int], step: int, inputs: tuple) -> KeptResiduals | None:
        """What was kept for ``key`` before ``step``, if it fits ``inputs`` (hidden, encoder); else ``None``."""
        kept = self._store.get(key)
        if kept is None or kept.step >= step:
            return None
        for r, x in zip(kept.residuals, inputs):
            if r is None:
                continue
            if not isinstance(x, torch.Tensor) or x.shape != r.shape:
                return None
        return kept

    def __len__(self) -> int:
        return len(self._store)

    def memory_bytes(self) -> int:
        """Bytes held by the kept residuals."""
        return sum(r.numel() * r.element_size() for k in self._store.values() for r in k.residuals if r is not None)

    def reset(self) -> None:
        """Drop every kept residual (between generations); counters stay."""
        self._store.clear()
        self._generation += 1

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.computed = 0
        self.reused = 0
        self.fallback = 0
        self.attention_skipped = 0
        self._steps: set[tuple[int, int]] = set()
        self._reuse_steps: set[tuple[int, int]] = set()

    def count(self, step: int, reused: bool, fallback: bool = False, attention_layers: int = 0) -> None:
        """Count one block call at ``step``; a reused block also skips its ``attention_layers``."""
        s = (self._generation, step)
        self._steps.add(s)
        if reused:
            self.reused += 1
            self.attention_skipped += attention_layers
            self._reuse_steps.add(s)
        else:
            self.computed += 1
            self.fallback += int(fallback)

    def stats(self) -> dict:
        """Block calls ``computed`` / ``reused`` / ``fallback`` (reuse steps that had to compute), steps
        (over all generations) where every block ``computed`` or some were ``reused``, self-attention
        calls skipped with reused blocks, residuals kept and their memory."""
        reuse_steps = len(self._reuse_steps)
        return {
            "blocks": {"computed": self.computed, "reused": self.reused, "fallback": self.fallback},
            "steps": {"computed": len(self._steps) - reuse_steps, "reused": reuse_steps},
            "attention_calls_skipped": self.attention_skipped,
            "kept": len(self._store),
            "memory_bytes": self.memory_bytes(),
        }
