"""GPU benchmark of the patterns and the pattern cache: what building a block layout costs next to the
attention call it serves, what a whole run pays for layout search as the engine pays it, and how our
kernel runs each pattern's layout against cuDNN (dense) and FlexAttention (same block mask).

Shapes (bf16, B=1, H=12, D=128, blocks 128x128): the Wan 2.1 480p grid 21x30x52 (tile 4x4x8) and the
18x48x80 grid (tile 6x8x8). Per pattern and shape:

* per layer and call: density, recall on a structured q/k (local attention plus a few global keys, as
  video DiTs have), our attention time per call, Flex on the same layout, cuDNN dense;
* ``build ms``: median time of one fresh build, device work included (synchronised); only the token
  layout's index tables (made once per layout and device) are warm, no mask is memoised;
  ``refresh ms``: what a later rebuild of the same shape costs: for a union, the static member's mask
  (Tile3D) is memoised by the pattern (``UnionPattern`` keeps it per context), so a refresh of
  ``tile3d+topk`` recomputes only the top-k part; for the other patterns it is another fresh build.

Search share (issue #3: "over a 50-step run with the cache below 3% of attention time"). It is computed
as the engine pays it, over a whole model, not for one layer:

* a run of ``--steps`` (50) denoising steps of a model with ``--layers`` L self-attention layers
  (default 30, as Wan 2.1 1.3B; L is in the table) is driven through the real
  :class:`~dit_sparse.engine.SparseAttentionEngine` (``plan`` / ``attend`` per layer and step, the same
  code path ``apply_sparse_attention`` runs), 20% dense warm-up steps, then every layer sparse;
* the cache policy is the one of the preset that uses the pattern (``dit_sparse/presets.py``):
  ``tile3d`` as ``fast`` / ``turbo`` / ``quality`` (no refresh), ``tile3d+topk`` as ``balanced``
  (``refresh_every=5``); ``topk`` and ``spatiotemporal``, which no preset uses alone, get the policy of
  ``balanced``, the preset with a dynamic pattern. ``refresh_every`` / ``drift_threshold`` /
  ``share_across_layers`` are read from the preset, not typed in here;
* so, as in the engine, a static pattern (Tile3D, no q/k) is cached under one owner for all layers and
  built once per run; a dynamic one (TopK, SpatioTemporal, and unions holding one) is built per layer
  on its first sparse step and on each refresh;
* search time, two ways, per ``PatternCache.get_or_build`` call of the run:
  - device time (``search_device_ms``, the share the targets are read on): what the builds occupy the
    GPU when the host runs ahead of it, as in a real run of a large model, where the host queues the
    next layers' work while the GPU computes. Before each lookup the GPU is given ~2 ms of queued work
    (``torch.cuda._sleep``), then CUDA events bracket the lookup: the span covers exactly the kernels the
    build queued (a hit queues none: 0). Host time that the GPU does not wait for is not counted;
  - synchronised wall time (``search ms (sync)``): each lookup timed from an idle device, a build until
    its device work is done, a hit by its host time - launch latencies included, as a small model whose
    host cannot run ahead would pay them;
  share = search time / (sparse attention calls x our attention time per call, measured on its own).
  ``search_share_of_wall`` in the JSON divides the synchronised time by the run's wall time instead.

Reading the share: a static pattern's one build is spread over L x sparse steps attention calls, so its
share falls with L; a dynamic pattern's share is about (builds per layer x build time) / (sparse steps
x attention time) whatever L (each layer pays its own builds), i.e. build / (refresh_every x attention).

Also reported: the Tile3D (3,3,3) window on the 18x48x80 grid with 6x8x8 tiles (density 15%, as Sliding
Tile Attention): target at least 6x faster than cuDNN dense (Flex reaches 4.5x).

Writes ``benchmarks/patterns.json`` and ``benchmarks/patterns.md``.

    python scripts/bench_patterns.py [--out benchmarks] [--layers 30] [--steps 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_ms, env_info, markdown_table, rel_rms, sync, write_report  # noqa: E402

from dit_sparse.config import SparseAttentionConfig  # noqa: E402
from dit_sparse.engine import SparseAttentionEngine, build_pattern  # noqa: E402
from dit_sparse.layout import TokenLayout  # noqa: E402
from dit_sparse.patterns import PatternContext, UnionPattern, attention_recall  # noqa: E402
from dit_sparse.presets import PRESETS  # noqa: E402

HEADS, HEAD_DIM = 12, 128
BLOCK = 128
DENSE_STEPS = 0.2
_BUSY_CYCLES = 4_000_000  # ~2 ms of an H200 SM clock: longer than any build takes the host to queue
SHAPES = {
    "wan480p_21x30x52": ((21, 30, 52), (4, 4, 8)),
    "grid_18x48x80": ((18, 48, 80), (6, 8, 8)),
}
# Benchmark name -> SparseAttentionConfig pattern fields.
PATTERNS = {
    "tile3d_3x3x3": dict(pattern="tile3d", window=(3, 3, 3)),
    "spatiotemporal": dict(pattern="spatiotemporal"),
    "topk_10%": dict(pattern="topk", topk_ratio=0.10),
    "tile3d_3x3x3+topk_5%": dict(pattern="tile3d+topk", window=(3, 3, 3), topk_ratio=0.05),
}
# Pattern -> the preset whose cache policy it runs with (see the module docstring).
POLICY_PRESET = {"tile3d": "fast", "tile3d+topk": "balanced", "topk": "balanced", "spatiotemporal": "balanced"}
_POLICY_FIELDS = ("refresh_every", "drift_threshold", "share_across_layers")


def preset_policy(pattern: str) -> tuple[str, dict]:
    """(preset name, its pattern-cache fields) for a config ``pattern`` string."""
    name = POLICY_PRESET[pattern]
    defaults = SparseAttentionConfig()
    fields = PRESETS[name].fields
    return name, {f: fields.get(f, getattr(defaults, f)) for f in _POLICY_FIELDS}


def structured_qk(tl: TokenLayout, device, dtype, n_global: int = 8, seed: int = 0):
    """q/k in tile order with local structure: each token's vector is a smooth function of its (t, h, w)
    position plus noise, so nearby tokens score high; a few random 'global' keys score high for all."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    f, h, w = tl.frames, tl.height, tl.width
    t_idx, h_idx, w_idx = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([t_idx.flatten() / 2.0, h_idx.flatten() / 4.0, w_idx.flatten() / 4.0], -1)  # [S, 3]
    freqs = torch.randn(3, HEAD_DIM // 2, generator=g) * 0.6
    ang = pos @ freqs
    base = torch.cat([ang.sin(), ang.cos()], -1)  # [S, D]
    q = base[None, None].repeat(1, HEADS, 1, 1) * 3.0 + 0.5 * torch.randn(1, HEADS, pos.shape[0], HEAD_DIM, generator=g)
    k = base[None, None].repeat(1, HEADS, 1, 1) * 3.0 + 0.5 * torch.randn(1, HEADS, pos.shape[0], HEAD_DIM, generator=g)
    glob = torch.randint(0, pos.shape[0], (n_global,), generator=g)
    k[:, :, glob] += q.mean(2, keepdim=True) * 2.0
    q, k = tl.permute(q, 2), tl.permute(k, 2)
    return q.to(device, dtype), k.to(device, dtype)


def timed_build(pattern, ctx, q, k, cold: bool, reps: int = 5) -> float:
    """Median ms of one build (synchronised). ``cold``: drop a union's memoised static mask first."""
    def build():
        if cold and isinstance(pattern, UnionPattern):
            pattern.clear_static_cache()
        return pattern.build(ctx, q, k) if pattern.needs_qk else pattern.build(ctx)

    build()
    sync(ctx.device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        build()
        sync(ctx.device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def engine_run(config: SparseAttentionConfig, tl: TokenLayout, q, k, v, layers: int, steps: int,
               timing: str = "sync") -> dict:
    """Drive a :class:`SparseAttentionEngine` through ``steps`` denoising steps of a model with ``layers``
    self-attention layers on q, k, v (``[B, H, S, D]``, model token order, the same for every layer).

    ``timing="sync"``: every ``PatternCache.get_or_build`` call is timed from an idle device: a build until
    the device finished its work (sync after it), a hit by its host time (it queues no device work).
    ``timing="device"`` (CUDA only): the device is kept busy ahead of each lookup and CUDA events bracket
    it, so a build counts the device time of its kernels only and a hit counts 0. Returns lookups, hits,
    builds, sparse calls, search seconds (all lookups, and builds / hits apart) and the wall time of the run.
    """
    if timing not in ("sync", "device"):
        raise ValueError(f"timing must be 'sync' or 'device', got {timing!r}")
    engine = SparseAttentionEngine(config, num_steps=steps)
    modules = [torch.nn.Module() for _ in range(layers)]
    engine.add_layers([(f"blocks.{i}.attn1", m) for i, m in enumerate(modules)])
    cache, device = engine.cache, q.device
    real_get_or_build = cache.get_or_build
    acc = {"build_s": 0.0, "hit_s": 0.0, "builds": 0, "hits": 0}
    events = []

    def timed_get_or_build(key, step, build_fn, *args, **kwargs):
        built = []

        def build():
            built.append(True)
            return build_fn()

        if timing == "device":
            torch.cuda._sleep(_BUSY_CYCLES)  # queued work: the host runs ahead while the lookup queues its own
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layout = real_get_or_build(key, step, build, *args, **kwargs)
            end.record()
            if built:
                events.append((start, end))
                acc["builds"] += 1
            else:
                acc["hits"] += 1
            return layout
        sync(device)  # the device is idle: a build's device work is timed on its own
        t0 = time.perf_counter()
        layout = real_get_or_build(key, step, build, *args, **kwargs)
        if built:
            sync(device)
            acc["build_s"] += time.perf_counter() - t0
            acc["builds"] += 1
        else:  # a hit queues no device work (tests/test_cache.py checks it): its cost is host time
            acc["hit_s"] += time.perf_counter() - t0
            acc["hits"] += 1
        return layout

    cache.get_or_build = timed_get_or_build
    video_len = tl.video_len
    sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        engine.begin_call(tl.grid, 0, 1000.0 * (1 - step / steps), step_index=step, num_steps=steps)
        for m in modules:
            plan = engine.plan(m, q.shape[-1], video_len, 0, False)
            if plan is not None:
                engine.attend(plan, q, k, v)
        engine.end_call()
    sync(device)
    wall = time.perf_counter() - t0
    acc["build_s"] += sum(a.elapsed_time(b) for a, b in events) * 1e-3
    stats = cache.stats()
    if stats["builds"] != acc["builds"] or stats["hits"] != acc["hits"]:
        raise RuntimeError(f"lookup accounting disagrees with the cache: {acc} vs {stats}")
    return {
        "layers": layers, "steps": steps, "sparse_calls": engine.counts["sparse"],
        "lookups": acc["builds"] + acc["hits"], "builds": acc["builds"], "hits": acc["hits"],
        "search_s": acc["build_s"] + acc["hit_s"], "build_s": acc["build_s"], "hit_s": acc["hit_s"],
        "wall_s": wall,
    }


def make_config(fields: dict, tile, backend: str = "auto") -> tuple[SparseAttentionConfig, str]:
    preset, policy = preset_policy(fields["pattern"])
    cfg = SparseAttentionConfig(**fields, **policy, tile=tuple(tile), block_size=BLOCK, dense_steps=DENSE_STEPS,
                                text_always_on=False, backend=backend)
    return cfg, preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--layers", type=int, default=30, help="self-attention layers of the model (Wan 2.1 1.3B: 30)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps of the run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_patterns needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from dit_sparse.kernels import block_sparse_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows, results = [], []
    for shape_name, (grid, tile) in SHAPES.items():
        tl = TokenLayout(*grid, tile=tile)
        ctx = PatternContext(tl, batch=1, heads=HEADS, block_q=BLOCK, block_kv=BLOCK, device=dev)
        q, k = structured_qk(tl, dev, dt)
        v = torch.randn_like(q)
        q_m, k_m, v_m = tl.unpermute(q, 2), tl.unpermute(k, 2), tl.unpermute(v, 2)  # model order, for the engine
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for pname, fields in PATTERNS.items():
            cfg, preset = make_config(fields, tile)
            pattern = build_pattern(cfg)
            build_ms = timed_build(pattern, ctx, q, k, cold=True)
            refresh_ms = timed_build(pattern, ctx, q, k, cold=False)
            layout = pattern.build(ctx, q, k) if pattern.needs_qk else pattern.build(ctx)
            layout = layout.expand(1, HEADS)
            density = float(layout.density().mean())
            recall = float(attention_recall(layout, q.float(), k.float()).mean())
            ours_ms = bench_ms(lambda: block_sparse_attention(q, k, v, layout))
            bm = layout.to_flex_block_mask()
            out_ours = block_sparse_attention(q, k, v, layout)
            out_flex = flex(q, k, v, block_mask=bm)
            err = rel_rms(out_flex, out_ours)
            flex_ms = bench_ms(lambda: flex(q, k, v, block_mask=bm))

            run = engine_run(cfg, tl, q_m, k_m, v_m, args.layers, args.steps)
            run_dev = engine_run(cfg, tl, q_m, k_m, v_m, args.layers, args.steps, timing="device")
            attn_s = run["sparse_calls"] * ours_ms * 1e-3
            share = run["search_s"] / attn_s
            share_dev = run_dev["search_s"] / attn_s
            row = dict(
                shape=shape_name, tile="x".join(map(str, tile)), pattern=pattern.name, density=density,
                recall=recall, build_ms=build_ms, refresh_ms=refresh_ms, ours_ms=ours_ms, flex_ms=flex_ms,
                cudnn_dense_ms=dense_ms, speedup_vs_cudnn=dense_ms / ours_ms,
                flex_speedup_vs_cudnn=dense_ms / flex_ms, ours_vs_flex=flex_ms / ours_ms, rel_rms_vs_flex=err,
                policy_preset=preset, refresh_every=cfg.refresh_every, drift_threshold=cfg.drift_threshold,
                run=run, attention_s=attn_s, search_share=share, run_device=run_dev,
                search_device_ms=run_dev["search_s"] * 1e3, search_share_device=share_dev,
                search_share_of_wall=run["search_s"] / run["wall_s"],
            )
            results.append(row)
            rows.append([shape_name, row["tile"], pname, density, recall, build_ms, refresh_ms, ours_ms, flex_ms,
                         dense_ms, row["speedup_vs_cudnn"], row["ours_vs_flex"], preset, args.layers,
                         run["sparse_calls"], run["builds"], run_dev["search_s"] * 1e3, f"{100 * share_dev:.2f}%",
                         run["search_s"] * 1e3, f"{100 * share:.2f}%"])
            print(rows[-1], flush=True)
    env = env_info()
    policies = "; ".join(sorted({f"`{preset_policy(f['pattern'])[0]}`: refresh_every="
                                 f"{preset_policy(f['pattern'])[1]['refresh_every']}" for f in PATTERNS.values()}))
    headers = ["shape", "tile", "pattern", "density", "recall", "build ms", "refresh ms", "ours ms", "Flex ms",
               "cuDNN dense ms", "ours x cuDNN", "ours / Flex", "cache policy", "layers L", "sparse calls",
               "builds", "search ms (device)", "search / attention (device)", "search ms (sync)",
               "search / attention (sync)"]
    md = (
        "# Patterns and pattern cache (GPU)\n\n"
        f"{env.get('gpu')}, {env['date']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}. "
        f"bf16, B=1, H={HEADS}, D={HEAD_DIM}, blocks {BLOCK}x{BLOCK}; structured q/k (local + 8 global keys). "
        "`x cuDNN` = cuDNN dense time / time (higher is faster); `ours / Flex` = Flex time / ours. "
        "`build ms`: one fresh build; `refresh ms`: a rebuild with a union's static member memoised.\n\n"
        f"Search share: a {args.steps}-step run of a model with L={args.layers} self-attention layers through "
        f"the engine ({int(DENSE_STEPS * 100)}% dense warm-up steps, then every layer sparse), with the cache "
        f"policy of the preset named ({policies}). Static patterns "
        "are built once for all layers, dynamic ones per layer. `search ms (device)`: the GPU time of all "
        "cache lookups of the run with the host running ahead (CUDA events; a hit queues no device work); "
        "`search ms (sync)`: the same lookups timed from an idle device (a build until its device work is done, "
        "a hit by its host time; launch latencies included), so it depends on how busy the host's CPUs were: "
        f"load {env['host_load_1min']} (1-minute average at the end of the run) on {env['host_cpus']} CPUs. "
        "share = search ms / (sparse calls x ours ms).\n\n"
        "Produced by `python scripts/bench_patterns.py`.\n\n" + markdown_table(headers, rows)
    )
    write_report(args.out, "patterns", {"env": env, "layers": args.layers, "steps": args.steps,
                                        "dense_steps": DENSE_STEPS, "results": results}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
