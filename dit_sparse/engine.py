"""The per-call sparse attention core shared by every processor of one application.

A :class:`SparseAttentionEngine` is the shared context between the transformer hook and the attention
processors (``dit_sparse/hooks.py``, ``dit_sparse/processors/``):

* the hook calls :meth:`~SparseAttentionEngine.begin_call` with the token grid of this forward, the
  timestep (advancing the :class:`~dit_sparse.schedule.StepState`) and the diffusers cache-context
  name, and :meth:`~SparseAttentionEngine.end_call` after it;
* a processor asks :meth:`~SparseAttentionEngine.plan` whether its layer runs on our path at all
  (``None``: compute exactly as the stock processor), then hands q, k, v ``[B, H, S, D]`` (after the
  model's norms and rotary, in the model's token order) to :meth:`~SparseAttentionEngine.attend`.

``attend`` carries out the schedule's decision: dense (SDPA, as the stock processor), sparse (permute
to tile order -> ``PatternCache.get_or_build(pattern.build)`` -> ``block_sparse_attention`` -> unpermute)
or reuse (``StepCache``). In ``mode="sla"`` the sparse step runs the layer's
``SparseLinearAttention`` (``attn.sla``) on the tile-ordered tokens instead of the pattern + kernel.
With ``reuse_scope="block"`` the attention schedule never reuses; whole transformer blocks are skipped
instead by the block hooks (``dit_sparse/block_hooks.py``), which read the step and branch from
:attr:`~SparseAttentionEngine.active_call` and keep their residuals in
:attr:`~SparseAttentionEngine.block_cache`.

Layouts are cached per (layer, pattern, token layout and heads, branch); the branch is the CFG pass
index (0 for the first forward of a timestep, 1 for a second one), so separate cond / uncond forwards
get their own layouts and a batched CFG forward one layout covering its batch.

Text keys behind a padding mask (HunyuanVideo, Mochi) never reach the kernel: the kernel attends to
the video keys, the text keys are attended densely with the mask in query chunks, and both parts are
merged by their log-sum-exp - masked text keys stay masked, exactly.

Statistics are plain Python counters plus the pattern cache's densities (tensors reduced only in
:meth:`~SparseAttentionEngine.stats`); transformer call times use CUDA events resolved on demand, so
the hot path makes no host sync.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_cache import BlockCache
from .cache import CacheKey, PatternCache
from .config import SparseAttentionConfig
from .layout import TokenLayout
from .schedule import Decision, StepSchedule, StepState
from .step_cache import StepCache

__all__ = ["SparseAttentionEngine", "CallInfo", "LayerInfo", "Plan", "build_pattern", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 96, 128)
# Query rows per chunk when text keys are attended densely next to the kernel (bounds fp32 logits memory).
_TEXT_CHUNK_ELEMENTS = 1 << 26
_MAX_TIMINGS = 100_000
# Cache owner of static patterns' layouts (the same for every layer).
_STATIC_LAYER = "<static>"


def build_pattern(config: SparseAttentionConfig, text_len: int = 0):
    """The :class:`~dit_sparse.patterns.Pattern` a config describes (union of its parts, plus the text
    rows/columns and the first-frame sink it asks for)."""
    from . import patterns as P

    if config.mode == "dense":
        return P.Dense()
    parts = []
    for name in config.pattern_parts:
        if name == "dense":
            parts.append(P.Dense())
        elif name == "tile3d":
            parts.append(P.Tile3D(config.window))
        elif name == "spatiotemporal":
            parts.append(P.SpatioTemporal())
        elif name == "topk":
            parts.append(P.TopK(ratio=config.topk_ratio, threshold=config.topk_threshold))
    if config.text_always_on and text_len > 0:
        parts.append(P.TextAlwaysOn())
    if config.first_frame_sink > 0:
        parts.append(P.FirstFrameSink(config.first_frame_sink))
    pattern = parts[0]
    for p in parts[1:]:
        pattern = pattern | p
    return pattern


@dataclass(frozen=True)
class LayerInfo:
    """One self-attention module handled by the engine: 0-based index among ``count`` layers, and name."""

    index: int
    name: str
    count: int


@dataclass
class CallInfo:
    """What the hook learned about the current transformer forward."""

    grid: tuple[int, int, int]  # (frames, height, width) tokens after patchify
    text_len: int  # text tokens inside joint attention (0 for cross-attention models)
    step: int
    branch: int
    num_steps: int | None


@dataclass(frozen=True)
class Plan:
    """What :meth:`SparseAttentionEngine.plan` decided for one attention call (opaque to processors)."""

    layer: LayerInfo
    decision: Decision
    token_layout: TokenLayout
    step: int
    branch: int
    # Under Ulysses context parallelism (dit_sparse/parallel.py): this rank's head shard
    # (dit_sparse.parallel.HeadShard); q, k, v then hold its heads only, and its layouts are cached apart.
    head_shard: object = None


class SparseAttentionEngine:
    """Shared state and the attention core of one ``apply_sparse_attention`` (see the module docstring).

    Args:
        config: the (already copied) :class:`SparseAttentionConfig`.
        num_steps: total denoising steps when known up front (else taken per call from the hook).
    """

    def __init__(self, config: SparseAttentionConfig, num_steps: int | None = None):
        if not isinstance(config, SparseAttentionConfig):
            raise ValueError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
        self.config = config
        self.num_steps = num_steps
        block_scope = config.reuse_scope == "block"
        self.schedule = StepSchedule(
            dense_steps=config.dense_steps,
            dense_layers=config.dense_layers,
            reuse_every=None if block_scope else config.reuse_every,
            reuse_mode=config.reuse_mode,
        )
        # Block-level step caching (reuse_scope="block"): residuals and counters of the block hooks.
        self.block_cache = BlockCache(config.dense_steps, config.reuse_every) if block_scope else None
        self.cache = PatternCache(
            refresh_every=config.refresh_every,
            drift_threshold=config.drift_threshold,
            share_across_layers=config.share_across_layers,
        )
        self.step_cache = StepCache(config.reuse_mode)
        self.state = StepState()
        self.layers: dict[int, LayerInfo] = {}  # id(attention module) -> LayerInfo
        self.modules: dict[int, object] = {}  # id -> module (keeps ids valid while applied)
        self.call: CallInfo | None = None
        self._last_call: CallInfo | None = None  # for activation-checkpointing recomputation in backward
        self.skipped: dict[str, str] = {}  # module name -> why it was left untouched
        self._patterns: dict[int, object] = {}
        self._restricted: dict[tuple, tuple] = {}
        # mode="sla": layer name -> its SparseLinearAttention (registered by apply as <attention>.sla)
        self.sla_modules: dict[str, torch.nn.Module] = {}
        self.reset_stats()

    # ------------------------------------------------------------------ registration
    def add_layers(self, named_modules: list[tuple[str, object]]) -> None:
        """Register one transformer's self-attention modules, numbered 0.. in model order.

        Called once per transformer sharing this engine (Wan 2.2's two experts): each numbers its own
        layers (``dense_layers`` / ``skip_layers`` apply to each), names must differ.
        """
        count = len(named_modules)
        for i, (name, module) in enumerate(named_modules):
            self.layers[id(module)] = LayerInfo(i, name, count)
            self.modules[id(module)] = module

    def add_sla_modules(self, modules: dict[str, torch.nn.Module], prefix: str = "") -> None:
        """``mode="sla"``: the SparseLinearAttention of each layer, by module name (``prefix`` + name)."""
        for name, module in modules.items():
            self.sla_modules[prefix + name] = module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_of(self, attn) -> LayerInfo | None:
        return self.layers.get(id(attn))

    # ------------------------------------------------------------------ hook side
    def begin_call(self, grid, text_len: int, timestep, step_index: int | None = None,
                   num_steps: int | None = None) -> CallInfo:
        """Start a transformer forward: token grid, text length, and where the denoising loop is.

        ``step_index`` (from diffusers' cache context, when the pipeline gives one) wins over counting
        distinct timesteps. A timestep larger than the previous one, or a step index going back to 0,
        starts a new generation (:meth:`reset_generation`).
        """
        t = _timestep_value(timestep)
        prev = self.state.timestep
        new_generation = prev is not None and (
            t > _timestep_value(prev) + 1e-6 or (step_index is not None and step_index < self.state.step)
        )
        if new_generation:
            self.reset_generation()
        self.state.advance(t)
        if step_index is not None and step_index != self.state.step:
            self.state.step = int(step_index)
        n = num_steps if num_steps is not None else self.num_steps
        self.call = CallInfo(tuple(int(x) for x in grid), int(text_len), self.state.step, self.state.branch, n)
        self.steps_seen.add(self.state.step)
        self.transformer_calls += 1
        return self.call

    def end_call(self) -> None:
        self._last_call = self.call
        self.call = None

    @property
    def active_call(self) -> CallInfo | None:
        """The transformer forward attention runs in: :attr:`call` during a forward; during backward, the
        last forward's (gradient checkpointing recomputes blocks after the forward ended, and must
        compute exactly what the forward did); else ``None``."""
        if self.call is not None:
            return self.call
        if self._last_call is not None and _in_backward():
            return self._last_call
        return None

    def schedule_num_steps(self, call: CallInfo) -> int | None:
        """The step count the schedules use for ``call`` (at least ``call.step + 1``).

        Raises ``ValueError`` when it is unknown but a fractional ``dense_steps`` needs it.
        """
        n = call.num_steps
        if n is not None and call.step >= n:
            n = call.step + 1
        if n is None and isinstance(self.config.dense_steps, float) and self.config.dense_steps > 0:
            raise ValueError(
                f"dense_steps={self.config.dense_steps} is a fraction but the number of denoising steps is "
                f"unknown: apply to the pipeline (not just its transformer), pass num_steps= to "
                f"apply_sparse_attention, or give dense_steps as an int"
            )
        return n

    def reset_generation(self) -> None:
        """Forget the denoising position and step-cached outputs (pattern layouts stay cached)."""
        self.state.reset()
        self.step_cache.reset()
        if self.block_cache is not None:
            self.block_cache.reset()
        self.call = None
        self._last_call = None
        self.generations += 1

    # ------------------------------------------------------------------ processor side
    def plan(self, attn, head_dim: int, video_len: int, text_len: int, text_first: bool) -> Plan | None:
        """Whether this self-attention call runs on our path; ``None`` = compute it as the stock processor.

        Reasons for ``None`` are counted in ``stats()["passthrough"]``: no hook call info (first call of
        a processor set without ``apply_sparse_attention``), a module this engine does not handle, a
        head dim the kernels do not cover, a sequence shorter than one block, a token count that does
        not match the grid, or a dense step / dense layer of the schedule.
        """
        layer = self.layers.get(id(attn))
        if layer is None:
            return self._passthrough("not_registered")
        call = self.active_call
        if call is None:
            return self._passthrough("no_call_info")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            return self._passthrough("head_dim")
        if self.config.mode == "sla" and layer.name not in self.sla_modules:
            return self._passthrough("no_sla_module")
        f, h, w = call.grid
        if video_len != f * h * w:
            return self._passthrough("grid_mismatch")
        seq = video_len + text_len
        if seq < self.config.block_size:
            return self._passthrough("short_sequence")
        n = self.schedule_num_steps(call)
        decision = self.schedule.decide(call.step, layer.index, num_steps=n, num_layers=layer.count)
        if decision.mode == "dense" and not decision.store_residual and not decision.store_output:
            self.counts["dense"] += 1
            return None
        tl = TokenLayout(f, h, w, text_len=text_len, text_first=text_first, tile=self.config.tile)
        return Plan(layer, decision, tl, call.step, call.branch)

    def _passthrough(self, reason: str) -> None:
        self.passthrough[reason] += 1
        return None

    def attend(self, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               text_valid: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Attention output ``[B, H, S, D]`` (model token order) for q, k, v ``[B, H, S, D]``.

        ``text_valid``: bool ``[B, text_len]``, False for padded text keys (they get no weight).
        """
        key = (plan.layer.name, plan.branch)
        decision = plan.decision
        dense_fn = lambda: _dense_attention(q, k, v, plan.token_layout, text_valid, scale)  # noqa: E731
        if self.config.mode == "sla":
            sparse_fn = lambda: self._sla(plan, q, k, v, text_valid, scale)  # noqa: E731
        else:
            sparse_fn = lambda: self._sparse(plan, q, k, v, text_valid, scale)  # noqa: E731
        self.counts[decision.mode] += 1
        return self.step_cache.run(decision, key, plan.step, dense_fn, sparse_fn)

    def _pattern_for(self, text_len: int):
        has_text = int(text_len > 0)
        p = self._patterns.get(has_text)
        if p is None:
            p = self._patterns[has_text] = build_pattern(self.config, text_len)
        return p

    def _sparse(self, plan: Plan, q, k, v, text_valid, scale) -> torch.Tensor:
        from .kernels import block_sparse_attention
        from .patterns import PatternContext

        tl = plan.token_layout
        pattern = self._pattern_for(tl.text_len)
        b, h = q.shape[0], q.shape[1]
        qp, kp, vp = tl.permute(q, 2), tl.permute(k, 2), tl.permute(v, 2)
        bs = self.config.block_size
        ctx = PatternContext(tl, batch=b, heads=h, block_q=bs, block_kv=bs, device=q.device)
        masked = text_valid is not None and tl.text_len > 0
        # A static pattern (no q/k) gives every layer the same layout: build it once for all layers.
        owner = plan.layer.name if pattern.needs_qk else _STATIC_LAYER
        shape = (tl, b if pattern.needs_qk else 1, h)
        if plan.head_shard is not None:
            shape += (("head_shard", plan.head_shard.index, plan.head_shard.count),)
        cache_key = CacheKey(owner, pattern.name, shape, plan.branch)

        def build():
            return pattern.build(ctx, qp, kp) if pattern.needs_qk else pattern.build(ctx)

        signature = None
        if self.config.drift_threshold is not None:
            signature = _block_means(qp, kp, bs)
        layout = self.cache.get_or_build(cache_key, plan.step, build, signature=signature)
        backend = self.config.backend
        if not masked:
            o = block_sparse_attention(qp, kp, vp, layout, scale=scale, backend=backend)
        else:
            nv = tl.video_len
            layout = self._video_keys_layout(plan.layer.name, plan.branch, layout, nv)
            o_v, lse_v = block_sparse_attention(
                qp, kp[:, :, :nv], vp[:, :, :nv], layout, scale=scale, return_lse=True, backend=backend
            )
            o = _merge_text_keys(qp, kp[:, :, nv:], vp[:, :, nv:], text_valid, o_v, lse_v, scale)
        return tl.unpermute(o, 2)

    def _sla(self, plan: Plan, q, k, v, text_valid, scale) -> torch.Tensor:
        """Sparse-linear attention of the layer's SparseLinearAttention over tile-ordered tokens; its
        critical blocks are chosen on every call (the same rule the fine-tune trained with)."""
        tl = plan.token_layout
        sla = self.sla_modules[plan.layer.name]
        if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError(f"mode='sla' uses the softmax scale 1/sqrt(head_dim); this model asks for {scale}; "
                             f"use mode='sparse'")
        if text_valid is not None and tl.text_len > 0 and not bool(text_valid.all()):
            raise ValueError(
                "mode='sla' cannot mask padded text keys (its linear part sums over every key); pass an "
                "unpadded prompt (all-True encoder_attention_mask) or use mode='sparse'"
            )
        qp, kp, vp = tl.permute(q, 2), tl.permute(k, 2), tl.permute(v, 2)
        layout = sla.select_blocks(qp, kp)
        d = layout.density().mean().detach().float()  # stays on the device: no sync here
        self._sla_density_sum = d if self._sla_density_sum is None else self._sla_density_sum + d
        self._sla_calls += 1
        return tl.unpermute(sla(qp, kp, vp, layout=layout), 2)

    def _video_keys_layout(self, layer: str, branch: int, layout, video_len: int):
        """``layout`` restricted to the video keys, memoised while the cache serves the same layout."""
        memo_key = (layer, branch)
        got = self._restricted.get(memo_key)
        if got is not None and got[0] is layout:
            return got[1]
        restricted = _video_keys_only(layout, video_len)
        self._restricted[memo_key] = (layout, restricted)
        return restricted

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.counts: Counter = Counter()
        self.passthrough: Counter = Counter()
        self.steps_seen: set[int] = set()
        self.transformer_calls = 0
        self.generations = 0
        self._timings: list = []
        self._sla_density_sum = None
        self._sla_calls = 0
        if hasattr(self, "cache"):
            self.cache.reset_stats()
        if getattr(self, "block_cache", None) is not None:
            self.block_cache.reset_stats()

    def timer_start(self, device: torch.device):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def timer_stop(self, start) -> None:
        if len(self._timings) >= _MAX_TIMINGS:
            return
        if isinstance(start, float):
            self._timings.append(time.perf_counter() - start)
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._timings.append((start, end))

    def stats(self) -> dict:
        """Counters and densities as plain Python numbers (resolves CUDA timings: one sync here).

        * ``calls``: attention calls per mode on our path (``dense`` counts schedule-dense calls computed
          by the stock path, ``sparse``, ``reuse``) and ``passthrough`` reasons
        * ``density``: mean fraction of token pairs kept by the sparse layouts served (``mode="sla"``: of
          the pairs attended exactly; the linear part covers the rest)
        * ``effective_density``: the same over all self-attention calls (dense = 1, output reuse and
          attention skipped with a reused block = 0)
        * ``cache``: the pattern cache's counters (hits, misses, build time, ...)
        * ``time_s`` / ``transformer_calls`` / ``time_per_call_s``: transformer forward wall time
        * ``steps`` (distinct steps seen), ``generations``, ``skipped`` (modules left untouched and why)
        * ``block_reuse`` (``reuse_scope="block"``, else ``None``): transformer block calls computed /
          reused / fallback, steps computed / with reused blocks, residual memory kept
          (:meth:`~dit_sparse.block_cache.BlockCache.stats`)
        """
        cache = self.cache.stats()
        times = []
        for t in self._timings:
            if isinstance(t, float):
                times.append(t)
            else:
                t[1].synchronize()
                times.append(t[0].elapsed_time(t[1]) / 1000.0)
        dens = cache["mean_density"]
        if self.config.mode == "sla":  # critical (exactly attended) blocks of the SLA calls
            dens = float(self._sla_density_sum) / self._sla_calls if self._sla_calls else float("nan")
        sparse_calls = self.counts["sparse"] + (self.counts["reuse"] if self.config.reuse_mode == "residual" else 0)
        total = self.counts["dense"] + self.counts["sparse"] + self.counts["reuse"]
        if self.block_cache is not None:  # attention calls skipped with reused blocks keep nothing
            total += self.block_cache.attention_skipped
        eff = float("nan")
        if total:
            kept = self.counts["dense"] + (dens * sparse_calls if sparse_calls else 0.0)
            eff = kept / total
        return {
            "config": self.config.to_dict(),
            "layers": self.num_layers,
            "calls": {**{m: self.counts[m] for m in ("dense", "sparse", "reuse")},
                      "passthrough": dict(self.passthrough)},
            "density": dens,
            "effective_density": eff,
            "cache": cache,
            "transformer_calls": self.transformer_calls,
            "time_s": float(sum(times)),
            "time_per_call_s": float(sum(times) / len(times)) if times else float("nan"),
            "steps": len(self.steps_seen),
            "generations": self.generations,
            "skipped": dict(self.skipped),
            "block_reuse": None if self.block_cache is None else self.block_cache.stats(),
        }


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (where checkpointed blocks recompute)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _timestep_value(timestep) -> float:
    """A scalar for ordering timesteps (max over per-token timesteps); one small host copy."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("the transformer got an empty timestep tensor; pass the step's timestep")
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return float(max(timestep))


def _video_keys_only(layout, video_len: int):
    """The layout restricted to keys ``[0, video_len)`` (text keys are attended outside the kernel)."""
    from .block_layout import BlockLayout, cdiv

    mk = cdiv(video_len, layout.block_kv)
    mask = layout.to_block_mask_tensor()[..., :mk]
    return BlockLayout.from_block_mask_tensor(mask, layout.q_len, video_len, layout.block_q, layout.block_kv)


def _block_means(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Drift signature: per-head mean of q and k over the first tokens of each block, fp32 ``[2, B, H, D]``."""
    return torch.stack([q[:, :, ::block].float().mean(2), k[:, :, ::block].float().mean(2)])


def _merge_text_keys(q, k_t, v_t, text_valid, o_v, lse_v, scale):
    """Add the (masked) text keys to a kernel output over video keys, merged by log-sum-exp.

    q ``[B, H, S, D]``; k_t, v_t ``[B, H, T, D]``; text_valid bool ``[B, T]``; o_v ``[B, H, S, D]`` and
    lse_v ``[B, H, S]`` (natural log) from the kernel. Query rows are processed in chunks.
    """
    b, h, s, d = q.shape
    t = k_t.shape[2]
    scale = d**-0.5 if scale is None else scale
    bias = torch.zeros(b, 1, 1, t, device=q.device, dtype=torch.float32)
    bias = bias.masked_fill(~text_valid.bool().view(b, 1, 1, t), float("-inf"))
    kt = k_t.float().transpose(-1, -2)
    vt = v_t.float()
    rows = max(1, _TEXT_CHUNK_ELEMENTS // max(1, b * h * t))
    out = torch.empty_like(o_v)
    for start in range(0, s, rows):
        sl = slice(start, min(s, start + rows))
        logits = (q[:, :, sl].float() @ kt) * scale + bias
        lse_t = torch.logsumexp(logits, dim=-1)
        lv = lse_v[:, :, sl].float()
        lse = torch.logaddexp(lv, lse_t)
        lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(logits - lse_safe.unsqueeze(-1))
        w_v = torch.exp(lv - lse_safe).unsqueeze(-1)
        out[:, :, sl] = (o_v[:, :, sl].float() * w_v + p @ vt).to(out.dtype)
    return out


def _dense_attention(q, k, v, tl: TokenLayout, text_valid, scale) -> torch.Tensor:
    """Dense SDPA as the stock processors compute it (boolean key mask for padded text keys)."""
    mask = None
    if text_valid is not None and tl.text_len > 0:
        b = q.shape[0]
        keep = torch.ones(b, tl.seq_len, dtype=torch.bool, device=q.device)
        if tl.text_first:
            keep[:, : tl.text_len] = text_valid.bool()
        else:
            keep[:, tl.video_len:] = text_valid.bool()
        mask = keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)
