"""GPU benchmark of the block-sparse attention kernel against cuDNN / FA2 SDPA (dense) and FlexAttention.

For each shape (Wan-480p: B1 H12 S32760 D128; Hunyuan-720p: B1 H24 S118800 D128; bf16) and density
(random 128x128 block masks keeping round(density * Mk) key blocks per query block, at least one; the
SAME mask for FlexAttention and ours), it times forward and forward+backward, after checking ours
against FlexAttention at every (shape, density) it times. Writes ``<out>/kernels.json`` and
``<out>/kernels.md`` and prints a compact table.

``--tune`` first sweeps our kernel variants at Wan-480p 25% - forward pointer vs TMA descriptor loads,
warp specialization, tiles / warps / stages; backward dQ by its own kernel ("separate") vs by atomics
from the dK/dV kernel ("atomic"), pointer vs TMA - checking each against FlexAttention before timing it.
The default run then autotunes among the three fastest verified configs of each kernel and uses the
faster dQ mode.

    python scripts/bench_kernels.py                      # default run (< 6 min on an H200)
    python scripts/bench_kernels.py --tune               # + variant sweep at Wan-480p 25% (~4 min in all)
    python scripts/bench_kernels.py --shapes wan --densities 0.1,0.5 --modes fwd
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

from _bench_util import attention_flops, bench_ms, env_info, markdown_table, rel_rms, tflops, write_report  # noqa: E402

SHAPES = {"wan": (1, 12, 32760, 128), "hunyuan": (1, 24, 118800, 128)}
# (warmup ms, rep ms) per shape: Hunyuan dense fwd+bwd is ~1 s a call, so few repetitions there.
TIMING = {"wan": (25, 100), "hunyuan": (20, 300)}
CHECK_DENSITY = 0.25
BLOCK = 128


def _import_kernels():
    """``dit_sparse.kernels`` from an installed package, or mapped from this checkout's ``kernels/``."""
    try:
        import dit_sparse.kernels.block_sparse  # noqa: F401
    except ImportError:
        import importlib.util

        import dit_sparse

        root = os.path.dirname(_HERE)
        spec = importlib.util.spec_from_file_location(
            "dit_sparse.kernels", os.path.join(root, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["dit_sparse.kernels"] = module
        spec.loader.exec_module(module)
        dit_sparse.kernels = module
    from dit_sparse.kernels.block_sparse import block_sparse_attention, triton_bwd, triton_fwd

    return block_sparse_attention, triton_fwd, triton_bwd


def random_layout(b, h, seq, density, seed, device):
    """Random block layout: every query block keeps ``max(1, round(density * Mk))`` key blocks."""
    from dit_sparse import BlockLayout

    m = math.ceil(seq / BLOCK)
    keep = max(1, min(m, round(density * m)))
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(b, h, m, m, generator=g, device=device)
    mask = torch.zeros(b, h, m, m, dtype=torch.bool, device=device)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return BlockLayout.from_block_mask_tensor(mask, seq, seq, BLOCK, BLOCK)


def make_providers(block_sparse_attention):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def sdpa(backend):
        def run(q, k, v, layout, block_mask):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    return {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "fa2": sdpa(SDPBackend.FLASH_ATTENTION),
        "flex": lambda q, k, v, layout, block_mask: flex(q, k, v, block_mask=block_mask),
        "ours": lambda q, k, v, layout, block_mask: block_sparse_attention(q, k, v, layout),
    }


def time_provider(fn, q, k, v, do, layout, block_mask, mode, timing):
    warmup, rep = timing
    if mode == "fwd":
        with torch.no_grad():
            return bench_ms(lambda: fn(q, k, v, layout, block_mask), warmup, rep)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    return bench_ms(lambda: fn(qg, kg, vg, layout, block_mask).backward(do), warmup, rep, grad_to_none=[qg, kg, vg])


def check_against_flex(providers, q, k, v, do, layout, block_mask) -> dict:
    """Ours vs FlexAttention on the same mask (bf16): relative RMS of o, dq, dk, dv."""
    out = {}
    results = []
    for name in ("flex", "ours"):
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = providers[name](qg, kg, vg, layout, block_mask)
        o.backward(do)
        results.append((o.detach(), qg.grad, kg.grad, vg.grad))
    for i, key in enumerate(("o", "dq", "dk", "dv")):
        out[key] = rel_rms(results[0][i], results[1][i])
    return out


VERIFY_TOL = 2e-2  # relative RMS vs FlexAttention in bf16; a correct kernel measures ~1e-3


def _verified(out: dict) -> bool:
    return all(isinstance(x, float) and x <= VERIFY_TOL for x in out.values())


def tune(providers, triton_fwd, triton_bwd, device) -> list[dict]:
    """Sweep our kernels' variants at Wan-480p 25%, each checked against FlexAttention before it is timed.

    Afterwards the autotuners hold only the three fastest verified configs of each kernel and
    ``triton_bwd.DEFAULT_DQ_MODE`` is the faster dQ mode, so the default run uses the sweep's picks.
    """
    b, h, s, d = SHAPES["wan"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))
    layout = random_layout(b, h, s, CHECK_DENSITY, 1, device)
    from dit_sparse.kernels.block_sparse.layout_ops import transpose_layout_tensors

    qc, qi = transpose_layout_tensors(layout.kv_counts, layout.kv_indices, layout.num_q_blocks)
    c, i = layout.kv_counts, layout.kv_indices
    scale = d ** -0.5
    density = layout.density().mean().item()
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref_o = providers["flex"](qg, kg, vg, layout, layout.to_flex_block_mask())
    ref_o.backward(do)
    ref = dict(o=ref_o.detach(), dq=qg.grad, dk=kg.grad, dv=vg.grad)
    del qg, kg, vg
    rows = []

    def record(kernel, cfg, fn, check, flops):
        row = dict(kernel=kernel, config=list(cfg), ms=None, tflops=None)
        try:
            out = fn()
            row["err"] = {key: rel_rms(ref[key], val) for key, val in zip(check, out)}
            if _verified(row["err"]):
                row["ms"] = bench_ms(fn, 10, 60)
                row["tflops"] = tflops(flops, row["ms"])
            else:
                row["error"] = "mismatch"
        except Exception as e:  # over-sized configs (shared memory) or compile failures are results, not crashes
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        ms = row["ms"] if row["ms"] is None else round(row["ms"], 3)
        print(f"  tune {kernel:15s} {str(list(cfg)):34s} {ms} ms {row.get('error', '')}", flush=True)

    fwd_flops = attention_flops(b, h, s, s, d, density, "fwd")
    for cfg in triton_fwd.FWD_TUNE_SPACE:
        record("fwd", cfg, lambda: triton_fwd.block_sparse_fwd(q, k, v, c, i, scale, BLOCK, BLOCK, config=cfg)[:1],
               ("o",), fwd_flops)
    o, lse = triton_fwd.block_sparse_fwd(q, k, v, c, i, scale, BLOCK, BLOCK, config=triton_fwd.FWD_TUNE_SPACE[0])
    bwd_flops = 2.5 * fwd_flops
    dq_fixed = triton_bwd.DQ_TUNE_SPACE[0]

    def bwd(dkdv_cfg, dq_cfg, mode):
        return lambda: triton_bwd.block_sparse_bwd(do, None, q, k, v, o, lse, c, i, qc, qi, scale, BLOCK, BLOCK,
                                                   dkdv_config=dkdv_cfg, dq_config=dq_cfg, dq_mode=mode)

    for mode in triton_bwd.DQ_MODES:
        for cfg in triton_bwd.DKDV_TUNE_SPACE:
            record(f"dkdv-{mode}", cfg, bwd(cfg, dq_fixed, mode), ("dq", "dk", "dv"), bwd_flops)
    best = _fastest(rows, "dkdv-separate", 1)
    dkdv_sep = tuple(best[0]) if best else triton_bwd.DKDV_TUNE_SPACE[0]
    for cfg in triton_bwd.DQ_TUNE_SPACE:
        record("dq-separate", cfg, bwd(dkdv_sep, cfg, "separate"), ("dq", "dk", "dv"), bwd_flops)

    _restrict(triton_fwd._block_sparse_fwd_kernel, [triton_fwd._to_triton(triton_fwd.FwdConfig(*x))
                                                    for x in _fastest(rows, "fwd", 3)])
    sep = min((r["ms"] for r in rows if r["kernel"] == "dq-separate" and r["ms"]), default=None)
    atom = min((r["ms"] for r in rows if r["kernel"] == "dkdv-atomic" and r["ms"]), default=None)
    mode = "atomic" if atom and (not sep or atom < sep) else "separate"
    triton_bwd.DEFAULT_DQ_MODE = mode
    _restrict(triton_bwd._bwd_dkdv, [_dkdv_triton(triton_bwd, x) for x in _fastest(rows, f"dkdv-{mode}", 3)])
    _restrict(triton_bwd._bwd_dq, [_dq_triton(triton_bwd, x) for x in _fastest(rows, "dq-separate", 3)])
    print(f"  tune picks: dq mode {mode} (bwd ms separate {sep}, atomic {atom}); autotuners narrowed to the "
          f"3 fastest verified configs each", flush=True)
    return rows


def _fastest(rows, kernel, n):
    ok = sorted((r for r in rows if r["kernel"] == kernel and r["ms"] is not None), key=lambda r: r["ms"])
    return [r["config"] for r in ok[:n]]


def _restrict(autotuner, configs) -> None:
    """Let ``autotuner`` choose among ``configs`` only (sweep-verified), forgetting earlier picks."""
    if configs:
        autotuner.configs = configs
        autotuner.cache.clear()


def _dkdv_triton(triton_bwd, cfg):
    import triton

    c = triton_bwd.DkdvConfig(*cfg)
    return triton.Config({"BLOCK_N1": c.block_n1, "BLOCK_M1": c.block_m1, "USE_TMA": c.tma},
                         num_warps=c.num_warps, num_stages=c.num_stages)


def _dq_triton(triton_bwd, cfg):
    import triton

    c = triton_bwd.DqConfig(*cfg)
    return triton.Config({"BLOCK_M2": c.block_m2, "BLOCK_N2": c.block_n2, "USE_TMA": c.tma},
                         num_warps=c.num_warps, num_stages=c.num_stages)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="wan,hunyuan", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--densities", default="0.05,0.1,0.25,0.5,1.0")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--tune", action="store_true", help="sweep our kernel configs at Wan-480p 25%% first")
    p.add_argument("--out", default="benchmarks/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.densities = [float(x) for x in args.densities.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            p.error(f"unknown mode {m!r}; use fwd, fwdbwd")
    for x in args.densities:
        if not 0 < x <= 1:
            p.error(f"density {x} must be in (0, 1]")
    return args


def build_markdown(info, rows, checks, tune_rows, best_configs) -> str:
    lines = [
        "# Block-sparse attention kernel benchmark",
        "",
        f"GPU: {info.get('gpu')} | date: {info['date']} | torch {info['torch']} | triton {info['triton']} | "
        f"CUDA {info['cuda']} | cuDNN {info['cudnn']}",
        "",
        "Effective TFLOP/s = 4*B*H*Sq*Skv*D*density / time for fwd, 3.5x that for fwd+bwd, with density the "
        "ACTUAL kept fraction of the layout (1 for dense cuDNN / FA2). `vs cuDNN` = cuDNN dense time / time "
        "(same mode); `vs Flex` = Flex time / our time on the identical block mask (> 1: we are faster); "
        "`rate/cuDNN` = effective rate / cuDNN dense rate.",
        "",
        markdown_table(
            ["shape", "mode", "provider", "density", "ms", "eff TFLOP/s", "vs cuDNN", "vs Flex", "rate/cuDNN"],
            [[r["shape"], r["mode"], r["provider"], r["density"], r["ms"], r["tflops"], r["speedup_vs_cudnn"],
              r["ratio_vs_flex"], r["rate_vs_cudnn"]] for r in rows],
        ),
        "",
        "## Correctness vs FlexAttention (bf16, relative RMS, every timed shape@density)",
        "",
        markdown_table(["shape@density", "o", "dq", "dk", "dv", "error"],
                       [[s, c.get("o"), c.get("dq"), c.get("dk"), c.get("dv"), c.get("error")]
                        for s, c in checks.items()]),
    ]
    if best_configs:
        lines += ["", "## Autotuner picks", "", *[f"- {k}: {v}" for k, v in best_configs.items()]]
    if tune_rows:
        lines += ["", "## Variant sweep (Wan-480p, 25%; fwd config = BLOCK_N, warps, stages, tma, warp_spec; "
                  "dkdv = N1, M1, warps, stages, tma; dq = M2, N2, warps, stages, tma; ms = fwd or whole bwd)", "",
                  markdown_table(["kernel", "config", "ms", "TFLOP/s", "max rel err", "error"],
                                 [[r["kernel"], str(r["config"]), r["ms"], r["tflops"],
                                   max(r["err"].values()) if r.get("err") else None, r.get("error")]
                                  for r in tune_rows])]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    device = "cuda"
    block_sparse_attention, triton_fwd, triton_bwd = _import_kernels()
    info = env_info()
    print(f"# {info}", flush=True)
    t_start = time.time()
    providers = make_providers(block_sparse_attention)
    tune_rows = tune(providers, triton_fwd, triton_bwd, device) if args.tune else []
    rows, checks = [], {}

    def save():
        best = {
            "fwd": str(getattr(triton_fwd._block_sparse_fwd_kernel, "best_config", None)),
            "dkdv": str(getattr(triton_bwd._bwd_dkdv, "best_config", None)),
            "dq": str(getattr(triton_bwd._bwd_dq, "best_config", None)),
            "dq_mode": triton_bwd.DEFAULT_DQ_MODE,
        }
        payload = dict(env=info, args=vars(args), rows=rows, checks=checks, tune=tune_rows, best_configs=best,
                       elapsed_s=round(time.time() - t_start, 1))
        write_report(args.out, "kernels", payload, build_markdown(info, rows, checks, tune_rows, best))

    for shape in args.shapes:
        b, h, s, d = SHAPES[shape]
        timing = TIMING[shape]
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))
        layouts = {x: random_layout(b, h, s, x, args.seed + 1 + j, device) for j, x in enumerate(args.densities)}
        # Check every layout we time first (the first check also runs our autotuners); a variant that
        # disagrees with FlexAttention is reported and not timed.
        bad = set()
        for x in sorted(layouts, key=lambda x: x != CHECK_DENSITY):  # autotune at the representative density
            layout = layouts[x]
            key = f"{shape}@{x:g}"
            try:
                checks[key] = check_against_flex(providers, q, k, v, do, layout, layout.to_flex_block_mask())
                if not _verified(checks[key]):
                    bad.add(x)
            except Exception:
                traceback.print_exc()
                checks[key] = {"error": traceback.format_exc(limit=1).strip().splitlines()[-1]}
                bad.add(x)
            print(f"[{shape}] check vs flex d={x:g}: {checks[key]}", flush=True)
        for mode in args.modes:
            dense = {}
            for name in ("cudnn", "fa2"):
                try:
                    dense[name] = time_provider(providers[name], q, k, v, do, None, None, mode, timing)
                except Exception as e:
                    print(f"[{shape}] {name} {mode} failed: {type(e).__name__}: {e}", flush=True)
                    dense[name] = None
            base_ms = dense["cudnn"]
            base_rate = tflops(attention_flops(b, h, s, s, d, 1.0, mode), base_ms) if base_ms else None
            for name, ms in dense.items():
                rate = tflops(attention_flops(b, h, s, s, d, 1.0, mode), ms) if ms else None
                rows.append(dict(shape=shape, mode=mode, provider=name, density=1.0, ms=ms, tflops=rate,
                                 speedup_vs_cudnn=base_ms / ms if ms and base_ms else None, ratio_vs_flex=None,
                                 rate_vs_cudnn=rate / base_rate if rate and base_rate else None))
            for x, layout in layouts.items():
                actual = layout.density().mean().item()
                bm = layout.to_flex_block_mask()
                times = {}
                for name in ("flex", "ours"):
                    if name == "ours" and x in bad:
                        times[name] = None
                        continue
                    try:
                        times[name] = time_provider(providers[name], q, k, v, do, layout, bm, mode, timing)
                    except Exception as e:
                        print(f"[{shape}] {name} {mode} {x} failed: {type(e).__name__}: {e}", flush=True)
                        times[name] = None
                for name, ms in times.items():
                    rate = tflops(attention_flops(b, h, s, s, d, actual, mode), ms) if ms else None
                    flex_ms = times.get("flex")
                    rows.append(dict(
                        shape=shape, mode=mode, provider=name, density=round(actual, 4), ms=ms, tflops=rate,
                        speedup_vs_cudnn=base_ms / ms if ms and base_ms else None,
                        ratio_vs_flex=flex_ms / ms if (name == "ours" and ms and flex_ms) else None,
                        rate_vs_cudnn=rate / base_rate if rate and base_rate else None,
                    ))
                print(f"[{shape}] {mode} d={actual:.3f} flex={times['flex']} ours={times['ours']} "
                      f"({time.time() - t_start:.0f}s)", flush=True)
            save()
        del q, k, v, do, layouts
        torch.cuda.empty_cache()
    save()

    print("\nshape   mode    provider density      ms  TFLOP/s vsCuDNN vsFlex rate/cuDNN")
    for r in rows:
        f = lambda x, w, p: f"{x:{w}.{p}f}" if isinstance(x, float) else f"{'-':>{w}}"  # noqa: E731
        print(f"{r['shape']:7s} {r['mode']:7s} {r['provider']:8s} {r['density']:7.3f} {f(r['ms'], 8, 2)} "
              f"{f(r['tflops'], 8, 0)} {f(r['speedup_vs_cudnn'], 7, 2)} {f(r['ratio_vs_flex'], 6, 2)} "
              f"{f(r['rate_vs_cudnn'], 9, 2)}")
    print(f"checks: {checks}")
    print(f"picks: fwd {getattr(triton_fwd._block_sparse_fwd_kernel, 'best_config', None)} | dkdv "
          f"{getattr(triton_bwd._bwd_dkdv, 'best_config', None)} | dq {getattr(triton_bwd._bwd_dq, 'best_config', None)}"
          f" | dq mode {triton_bwd.DEFAULT_DQ_MODE}")
    print(f"total {time.time() - t_start:.0f}s; wrote {os.path.join(args.out, 'kernels.md')}")


if __name__ == "__main__":
    main()
