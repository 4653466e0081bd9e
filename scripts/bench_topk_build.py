"""GPU micro-benchmark of one TopK layout build: the PyTorch chain against the fused Triton build.

* chain: ``block_scores`` (pool q, pool k, key mean, score) then ``topk`` / ``sort`` / index writes
  (``TopK._build_chain``; ~15 launches), and for the bool mask a union ORs, ``TopK.select`` on the scores;
* fused: ``kernels/block_score/topk_layout.py``, two launches (pool q and k together; score + select
  straight into the layout or mask): ``TopK._build_fused`` (what ``TopK.build`` takes on the fused
  path), and ``topk_block_mask``. Timed at every shape, also above ``FUSED_MAX_KV_BLOCKS`` where
  ``TopK`` itself takes the chain (column ``TopK takes``).

Shapes (bf16, B=1, D=128, blocks 128x128): Wan 2.1 480p (H=12, 21x30x52 = 32760 tokens, 256 blocks) and
HunyuanVideo 720p (H=24, 33x45x80 = 118800 tokens, 929 blocks) and bench_patterns' second grid (H=12,
18x48x80 = 69120 tokens, 540 blocks). Rules: ``ratio=0.1`` and
``threshold=0.9``. Per shape and rule, medians of ``triton.testing.do_bench`` (L2 flushed), in ms:

* ``chain build`` / ``fused build``: the layout; ``chain mask`` / ``fused mask``: the bool mask;
* ``pool`` / ``select ms``: the fused build's two launches alone; ``sort / bisect ms``: for the ratio rule,
  the select launch finding each row's n-th largest score by bitonic sort and by bisection (the launcher
  picks by row width, ``ratio_select_method``; flagged ``DIFFER`` if the two kept other blocks);
  ``pool GB/s``: bytes of q and k read by
  the pooling launch per second (its floor is the HBM bandwidth);
* ``host us``: host time to enqueue one fused / chain build (launch overhead; no sync inside);
* ``attn ms``: our block-sparse attention on the fused layout, and ``share``: fused (chain) build /
  (``refresh_every`` x attention), the search share of a layer refreshed every 5 steps (the ``balanced``
  preset); the target is below 3%;
* ``rows differ``: query-block rows whose layout differs between chain and fused (only blocks whose
  scores tie within fp32 rounding may swap; the fused path skips the key-mean centring).

With ``--sweep``, the select launch is also timed over tiles (query rows per program x warps), into
``select_sweep`` of the JSON and a second table.

Writes ``benchmarks/topk_build.json`` and ``benchmarks/topk_build.md`` (atomically). A case that fails
is recorded with its error and the run goes on.

    python scripts/bench_topk_build.py [--out benchmarks] [--shapes wan480p hunyuan720p grid18x48x80] [--no-attention]
        [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_ms, env_info, markdown_table, sync, write_report  # noqa: E402

from dit_sparse.layout import TokenLayout  # noqa: E402
from dit_sparse.patterns import PatternContext, TopK  # noqa: E402

BLOCK = 128
HEAD_DIM = 128
REFRESH_EVERY = 5  # the balanced preset's pattern-cache refresh
HOST_REPS = 50  # builds enqueued back to back to time the host side
# name -> (token grid, tile, heads)
SHAPES = {
    "wan480p": ((21, 30, 52), (4, 4, 8), 12),
    "hunyuan720p": ((33, 45, 80), (4, 8, 8), 24),
    "grid18x48x80": ((18, 48, 80), (6, 8, 8), 12),  # bench_patterns' second grid: Mk = 540
}
RULES = {"ratio0.1": dict(ratio=0.1), "threshold0.9": dict(threshold=0.9)}


def make_qk(heads: int, seq: int, device, dtype=torch.bfloat16, seed: int = 0):
    """Random q, k ``[1, H, S, D]`` with a per-head key offset (real keys share a large mean, which the
    chain's centring removes and the fused path does not need to)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, seq, HEAD_DIM, device=device, generator=g)
    k = torch.randn(1, heads, seq, HEAD_DIM, device=device, generator=g)
    k += 2.0 * torch.randn(1, heads, 1, HEAD_DIM, device=device, generator=g)
    return q.to(dtype), k.to(dtype)


def host_us(fn, device, reps: int | None = None) -> float:
    """Mean host time (us) to enqueue ``fn`` (no sync between calls; one before and after)."""
    reps = reps or HOST_REPS
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) / reps * 1e6


def rows_differ(a, b) -> int:
    diff = (a.kv_counts != b.kv_counts) | (a.kv_indices != b.kv_indices).any(-1)
    return int(diff.sum())


def select_args(q, k, seq_len: int, rule: dict) -> tuple:
    """The arguments ``TopK`` passes to the select launch, after its pooling launch:
    ``(q_t, k_t, kv_len, block_kv, scale, n_floor, threshold)`` for ``topk_select_triton``."""
    from dit_sparse.block_layout import cdiv
    from dit_sparse.kernels.block_score.topk_layout import _keep_rule, pool_qk_triton

    n_floor, thr = _keep_rule(cdiv(seq_len, BLOCK), rule.get("ratio"), rule.get("threshold"), 1)
    q_t, k_t = pool_qk_triton(q, k, BLOCK, BLOCK)
    return q_t, k_t, seq_len, BLOCK, q.shape[-1] ** -0.5, n_floor, thr


def bench_case(shape: str, rule_name: str, attention: bool = True, device="cuda") -> dict:
    """Time one (shape, rule) case; returns a result row (ms unless named otherwise)."""
    from dit_sparse.kernels.block_score import block_scores
    from dit_sparse.kernels.block_score.api import _use_triton
    from dit_sparse.kernels.block_score.topk_layout import pool_qk_triton, topk_block_mask, topk_select_triton

    grid, tile, heads = SHAPES[shape]
    rule = RULES[rule_name]
    tl = TokenLayout(*grid, tile=tile)
    dev = torch.device(device)
    ctx = PatternContext(tl, batch=1, heads=heads, block_q=BLOCK, block_kv=BLOCK, device=dev)
    q, k = make_qk(heads, tl.seq_len, dev)
    p = TopK(**rule)
    if not _use_triton(q, "auto"):
        raise RuntimeError("the fused path is not available on this device (needs CUDA or TRITON_INTERPRET=1)")

    def fused_build():  # timed at every size, also where TopK.build itself takes the chain
        return p._build_fused(ctx, q, k)

    fused = fused_build()
    chain = p._build_chain(ctx, q, k)
    row = dict(shape=shape, rule=rule_name, topk_path="fused" if p._fused(ctx, q) else "chain", heads=heads,
               seq_len=tl.seq_len, kv_blocks=ctx.num_kv_blocks, rows_differ=rows_differ(fused, chain),
               rows=fused.kv_counts.numel(), mean_kept_blocks=float(fused.kv_counts.float().mean()))
    row["chain_build_ms"] = bench_ms(lambda: p._build_chain(ctx, q, k))
    row["fused_build_ms"] = bench_ms(fused_build)
    row["chain_mask_ms"] = bench_ms(lambda: p.select(block_scores(q, k, BLOCK, BLOCK), tl.seq_len, BLOCK))
    row["fused_mask_ms"] = bench_ms(lambda: topk_block_mask(q, k, BLOCK, BLOCK, **rule))

    # The two launches alone (the same arguments TopK passes).
    args = select_args(q, k, tl.seq_len, rule)
    row["pool_ms"] = bench_ms(lambda: pool_qk_triton(q, k, BLOCK, BLOCK))
    row["select_ms"] = bench_ms(lambda: topk_select_triton(*args))
    if args[-1] is None:  # ratio rule: both ways to its n-th largest score, on the same tile
        by_sort = topk_select_triton(*args, ratio_select="sort")
        by_bisection = topk_select_triton(*args, ratio_select="bisect")
        row["ratio_select_same"] = all(torch.equal(a, b) for a, b in zip(by_sort, by_bisection))
        row["sort_select_ms"] = bench_ms(lambda: topk_select_triton(*args, ratio_select="sort"))
        row["bisect_select_ms"] = bench_ms(lambda: topk_select_triton(*args, ratio_select="bisect"))
    bytes_read = (q.numel() + k.numel()) * q.element_size()
    row["pool_gbps"] = bytes_read / (row["pool_ms"] * 1e-3) / 1e9
    row["fused_host_us"] = host_us(fused_build, dev)
    row["chain_host_us"] = host_us(lambda: p._build_chain(ctx, q, k), dev)
    row["speedup"] = row["chain_build_ms"] / row["fused_build_ms"]

    if attention:
        from dit_sparse.kernels import block_sparse_attention

        v = torch.randn_like(q)
        row["attn_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, fused))
        row["fused_share"] = row["fused_build_ms"] / (REFRESH_EVERY * row["attn_ms"])
        row["chain_share"] = row["chain_build_ms"] / (REFRESH_EVERY * row["attn_ms"])
    return row


# (query rows per program, warps) tried by --sweep, where the [rows, padded key blocks] tile has at most
# SWEEP_MAX_TILE elements (each one a compile).
SWEEP_ROWS = (2, 4, 8, 16)
SWEEP_WARPS = (4, 8, 16)
SWEEP_MAX_TILE = 8192


def sweep_case(shape: str, rule_name: str, device="cuda") -> list[dict]:
    """The select launch over tiles: one row per (rows per program, warps)."""
    import triton

    from dit_sparse.kernels.block_score.topk_layout import topk_select_triton

    grid, tile, heads = SHAPES[shape]
    tl = TokenLayout(*grid, tile=tile)
    q, k = make_qk(heads, tl.seq_len, torch.device(device))
    args = select_args(q, k, tl.seq_len, RULES[rule_name])
    bn = max(16, triton.next_power_of_2(args[1].shape[3]))  # the kernel's padded key blocks
    out = []
    for bm in SWEEP_ROWS:
        for warps in SWEEP_WARPS:
            if bm * bn > SWEEP_MAX_TILE:
                continue
            row = dict(shape=shape, rule=rule_name, block_m=bm, num_warps=warps)
            try:
                row["select_ms"] = bench_ms(lambda: topk_select_triton(*args, block_m=bm, num_warps=warps))
            except Exception as e:  # e.g. out of shared memory / registers: keep the others
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            out.append(row)
    return out


# (rows of a block per step, blocks per program, warps) of the pooling launch tried by --sweep; None: the
# launcher's own choice (kernels/block_score/pool_score.pool_tile), so the first row is the launcher's tile.
POOL_SWEEP = ((None, None, None), (64, 1, 4), (128, 1, 8), (64, 2, 8), (32, 2, 4), (64, 4, 8), (128, 2, 16))


def pool_sweep_case(shape: str, device="cuda") -> list[dict]:
    """The pooling launch over tiles: one row per (block rows, blocks per program, warps), its time, its read
    rate and whether its means equal the default tile's (to fp32 summation order)."""
    from dit_sparse.kernels.block_score.topk_layout import pool_qk_triton

    grid, tile, heads = SHAPES[shape]
    tl = TokenLayout(*grid, tile=tile)
    q, k = make_qk(heads, tl.seq_len, torch.device(device))
    ref = pool_qk_triton(q, k, BLOCK, BLOCK)
    bytes_read = 2 * q.numel() * q.element_size()
    out = []
    for rows, per_program, warps in POOL_SWEEP:
        row = dict(shape=shape, block_rows=rows or "launcher", blocks_per_program=per_program or "launcher",
                   num_warps=warps or "launcher")
        kw = dict(block_rows=rows, blocks_per_program=per_program, num_warps=warps)
        try:
            got = pool_qk_triton(q, k, BLOCK, BLOCK, **kw)
            row["max_diff"] = max((a - b).abs().max().item() for a, b in zip(got, ref))
            row["pool_ms"] = bench_ms(lambda: pool_qk_triton(q, k, BLOCK, BLOCK, **kw))
            row["pool_gbps"] = bytes_read / (row["pool_ms"] * 1e-3) / 1e9
        except Exception as e:  # e.g. out of registers: keep the others
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        out.append(row)
    return out


def run_bench(shapes=None, rules=None, attention: bool = True, log=print, device="cuda", sweep: bool = False) -> dict:
    """Every (shape, rule) case; a failing case is recorded with its error. Returns the JSON payload."""
    results, sweeps, pool_sweeps = [], [], []
    for shape in shapes or list(SHAPES):
        if sweep:
            try:
                pool_sweeps += pool_sweep_case(shape, device)
            except Exception as e:
                pool_sweeps.append(dict(shape=shape, error=f"{type(e).__name__}: {e}"[:200]))
        for rule_name in rules or list(RULES):
            try:
                row = bench_case(shape, rule_name, attention, device)
                if sweep:
                    sweeps += sweep_case(shape, rule_name, device)
            except Exception as e:  # keep the other cases' numbers
                row = dict(shape=shape, rule=rule_name, error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=5))
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results.append(row)
            log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "traceback"})
    payload = {"env": env_info(), "block": BLOCK, "head_dim": HEAD_DIM, "refresh_every": REFRESH_EVERY,
               "dtype": "bfloat16", "results": results}
    if sweep:
        payload["select_sweep"] = sweeps
        payload["pool_sweep"] = pool_sweeps
    return payload


def ratio_select_cell(r: dict):
    """The ratio rule's select by sort and by bisection, flagged if the two kept different blocks."""
    if "sort_select_ms" not in r:
        return None
    cell = f"{r['sort_select_ms']:.3g} / {r['bisect_select_ms']:.3g}"
    return cell if r["ratio_select_same"] else cell + " (DIFFER)"


def to_markdown(payload: dict) -> str:
    env = payload["env"]
    headers = ["shape", "rule", "TopK takes", "kv blocks", "kept (mean)", "chain build", "fused build", "speedup",
               "chain mask", "fused mask", "pool", "select ms", "sort / bisect ms", "pool GB/s", "chain host us",
               "fused host us", "attn ms", "chain share", "fused share", "rows differ"]
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["shape"], r["rule"], f"error: {r['error']}"] + [None] * (len(headers) - 3))
            continue
        share = (lambda x: None if x is None else f"{100 * x:.2f}%")
        rows.append([r["shape"], r["rule"], r["topk_path"], r["kv_blocks"], r["mean_kept_blocks"],
                     r["chain_build_ms"], r["fused_build_ms"], r["speedup"], r["chain_mask_ms"], r["fused_mask_ms"],
                     r["pool_ms"], r["select_ms"], ratio_select_cell(r), r["pool_gbps"], r["chain_host_us"],
                     r["fused_host_us"], r.get("attn_ms"), share(r.get("chain_share")), share(r.get("fused_share")),
                     f"{r['rows_differ']}/{r['rows']}"])
    md = (
        "# TopK layout build: PyTorch chain vs fused Triton (GPU)\n\n"
        f"{env.get('gpu')}, {env['date']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. "
        f"bf16, B=1, D={payload['head_dim']}, blocks {payload['block']}x{payload['block']}. Times in ms "
        "(median, `triton.testing.do_bench`) unless named; `TopK takes`: the path TopK builds with at that "
        f"size; `share` = build / (refresh_every={payload['refresh_every']} x attention on the fused layout); "
        "target below 3%. `rows differ`: query-block rows whose layout differs between the two paths (fp32 "
        "near-ties only).\n\n"
        "Produced by `python scripts/bench_topk_build.py`.\n\n" + markdown_table(headers, rows)
    )
    if payload.get("select_sweep"):
        sweep = [[r["shape"], r["rule"], r["block_m"], r["num_warps"],
                  r.get("select_ms", f"error: {r.get('error')}")] for r in payload["select_sweep"]]
        md += ("\n\n## Select launch over tiles (`--sweep`)\n\n"
               + markdown_table(["shape", "rule", "rows / program", "warps", "select ms"], sweep))
    if payload.get("pool_sweep"):
        pool = [[r["shape"], r.get("block_rows"), r.get("blocks_per_program"), r.get("num_warps"),
                 r.get("pool_ms", f"error: {r.get('error')}"), r.get("pool_gbps"), r.get("max_diff")]
                for r in payload["pool_sweep"]]
        md += ("\n\n## Pooling launch over tiles (`--sweep`; the first row is the launcher's choice)\n\n"
               + markdown_table(["shape", "rows / step", "blocks / program", "warps", "pool ms", "GB/s",
                                 "max diff vs first"], pool))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    ap.add_argument("--no-attention", action="store_true", help="skip the attention timing (and the share)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the select and pooling launches over tiles and warps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_topk_build needs a CUDA GPU", file=sys.stderr)
        return 2
    payload = run_bench(args.shapes, args.rules, attention=not args.no_attention, sweep=args.sweep)
    md = to_markdown(payload)
    os.makedirs(args.out, exist_ok=True)
    write_report(args.out, "topk_build", payload, md)
    print(md)
    return 0 if all("error" not in r for r in payload["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
