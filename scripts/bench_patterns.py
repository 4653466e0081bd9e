"""GPU benchmark of the patterns and the pattern cache: what building a block layout costs next to the
attention call it serves, and how our kernel runs each pattern's layout against cuDNN (dense) and
FlexAttention (same block mask).

Shapes (bf16, B=1, H=12, D=128): the Wan 2.1 480p grid 21x30x52 and the 18x48x80 grid. For each
pattern: median build time, density, recall on a structured q/k (local attention plus a few global keys,
as video DiTs have), attention time of ours / Flex on that layout, cuDNN dense time. Then a 50-step run
through :class:`~dit_sparse.cache.PatternCache` as a preset would use it (20% dense steps, refresh
every 5 steps for dynamic patterns): total layout-search time as a share of the sparse attention time.
Target: below 3%. And the Tile3D (3,3,3) window on the 18x48x80 grid with 6x8x8 tiles (density 15%,
as Sliding Tile Attention): at least 6x faster than cuDNN dense (Flex reaches 4.5x).

Writes ``benchmarks/patterns.json`` and ``benchmarks/patterns.md``.

    python scripts/bench_patterns.py [--out benchmarks]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_ms, env_info, markdown_table, rel_rms, write_report  # noqa: E402

from dit_sparse.cache import CacheKey, PatternCache  # noqa: E402
from dit_sparse.kernels import block_sparse_attention  # noqa: E402
from dit_sparse.layout import TokenLayout  # noqa: E402
from dit_sparse.patterns import (  # noqa: E402
    PatternContext,
    SpatioTemporal,
    Tile3D,
    TopK,
    attention_recall,
)

HEADS, HEAD_DIM = 12, 128
SHAPES = {
    "wan480p_21x30x52": ((21, 30, 52), (4, 4, 8)),
    "grid_18x48x80": ((18, 48, 80), (6, 8, 8)),
}


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


def timed_build(pattern, ctx, q, k) -> float:
    def build():
        return pattern.build(ctx, q, k) if pattern.needs_qk else pattern.build(ctx)

    build()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        build()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_patterns needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows, results = [], []
    for shape_name, (grid, tile) in SHAPES.items():
        tl = TokenLayout(*grid, tile=tile)
        ctx = PatternContext(tl, batch=1, heads=HEADS, device=dev)
        q, k = structured_qk(tl, dev, dt)
        v = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        patterns = {
            "tile3d_3x3x3": Tile3D((3, 3, 3)),
            "spatiotemporal": SpatioTemporal(),
            "topk_10%": TopK(ratio=0.10),
            "tile3d_3x3x3+topk_5%": Tile3D((3, 3, 3)) | TopK(ratio=0.05),
        }
        for pname, pattern in patterns.items():
            build_ms = timed_build(pattern, ctx, q, k)
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

            # 50 denoising steps through the cache: 20% dense, then sparse; dynamic patterns refresh every 5.
            cache = PatternCache(refresh_every=5 if pattern.needs_qk else None)
            key = CacheKey.for_attention("layer0", pattern.name, tl.seq_len, tl.seq_len, 128, 128, HEADS)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sparse_steps = 0
            for step in range(50):
                if step < 10:
                    continue
                sparse_steps += 1
                cache.get_or_build(key, step, lambda: pattern.build(ctx, q, k) if pattern.needs_qk else pattern.build(ctx))
            torch.cuda.synchronize()
            search_ms = (time.perf_counter() - t0) * 1e3
            share = search_ms / (sparse_steps * ours_ms)
            row = dict(
                shape=shape_name, tile="x".join(map(str, tile)), pattern=pattern.name, density=density,
                recall=recall, build_ms=build_ms, ours_ms=ours_ms, flex_ms=flex_ms, cudnn_dense_ms=dense_ms,
                speedup_vs_cudnn=dense_ms / ours_ms, flex_speedup_vs_cudnn=dense_ms / flex_ms,
                ours_vs_flex=flex_ms / ours_ms, cache_builds=cache.stats()["builds"],
                search_share_50_steps=share, rel_rms_vs_flex=err,
            )
            results.append(row)
            rows.append([shape_name, row["tile"], pname, density, recall, build_ms, ours_ms, flex_ms, dense_ms,
                         row["speedup_vs_cudnn"], row["flex_speedup_vs_cudnn"], row["ours_vs_flex"],
                         row["cache_builds"], f"{100 * share:.2f}%"])
            print(rows[-1], flush=True)
    env = env_info()
    headers = ["shape", "tile", "pattern", "density", "recall", "build ms", "ours ms", "Flex ms",
               "cuDNN dense ms", "ours x cuDNN", "Flex x cuDNN", "ours / Flex", "builds (50 steps)",
               "search / attention (50 steps)"]
    md = (
        "# Patterns and pattern cache (GPU)\n\n"
        f"{env.get('gpu')}, {env['date']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}. "
        "bf16, B=1, H=12, D=128, blocks 128x128; structured q/k (local + 8 global keys). "
        "`x cuDNN` = cuDNN dense time / time (higher is faster); `ours / Flex` = Flex time / ours. "
        "Search share = layout search time of a 50-step run (20% dense, dynamic patterns refreshed every 5 "
        "steps) over the sparse attention time of the same steps, one layer.\n\n"
        "Produced by `python scripts/bench_patterns.py`.\n\n" + markdown_table(headers, rows)
    )
    write_report(args.out, "patterns", {"env": env, "results": results}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
