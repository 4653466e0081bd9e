"""GPU benchmark of the block-sparse attention kernel against cuDNN / FA2 SDPA (dense) and FlexAttention.

For each shape (Wan-480p: B1 H12 S32760 D128; Hunyuan-720p: B1 H24 S118800 D128; bf16) and density
(random 128x128 block masks keeping round(density * Mk) key blocks per query block, at least one; the
SAME mask for FlexAttention and ours), it times forward and forward+backward, after checking ours
against FlexAttention at every (shape, density) it times - twice: the first call (the one that runs the
autotuners, and the index-list loop of a dense layout) and a later one (cached configs, the full-row loop).
A check that fails prints the kernel configs it ran with, and that density is not timed. Writes
``<out>/kernels.json`` and ``<out>/kernels.md`` and prints a compact table.

``--tune`` first sweeps a few kernel variants around the configs in the code, at Wan-480p 25% (and the
forward's full-row loop against the index-list loop at 100%), each checked against FlexAttention before it
is timed. The sweep only reports: the default run uses the config lists in ``kernels/block_sparse``.

    python scripts/bench_kernels.py                      # default run (~2.5 min on an H200)
    python scripts/bench_kernels.py --tune               # + variant sweep (~1 min more)
    python scripts/bench_kernels.py --shapes wan --densities 0.1,0.5 --modes fwd
    python scripts/bench_kernels.py --rounds 3            # every row timed 3x, interleaved; medians

Rows are timed in rounds (``--rounds``, default 1): each round times every provider once, in the same order,
so with several rounds a provider's samples spread over the run; the report has the median and, in the
JSON, each round's ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
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


HOPPER_SWITCHES = ("DIT_SPARSE_HOPPER_FWD", "DIT_SPARSE_HOPPER_BWD")


@contextlib.contextmanager
def hopper_off():
    """The Hopper kernels switched off (read at each call, so for forward and backward inside the block)."""
    old = {name: os.environ.get(name) for name in HOPPER_SWITCHES}
    os.environ.update({name: "0" for name in HOPPER_SWITCHES})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def kernel_names(q) -> dict:
    """Which forward, dK/dV and dQ kernels "ours" runs for bf16 D=128 128-blocks on this GPU."""
    from dit_sparse.kernels.block_sparse._hopper_common import hopper_bwd_supported
    from dit_sparse.kernels.block_sparse.hopper_fwd import hopper_fwd_supported

    gluon = "hopper (Gluon, warp-specialised)"
    bwd = gluon if hopper_bwd_supported(q, q, q, q, 128, 128) else "triton"
    return dict(fwd_kernel=gluon if hopper_fwd_supported(q, q, q, 128, 128) else "triton", dkdv_kernel=bwd,
                dq_kernel=bwd)


def sustain(call, seconds: float, grads=()) -> int:
    """Run ``call`` back to back for ``seconds`` (grads reset each time), so the GPU's clock settles where
    this call's own power draw puts it; returns the number of calls."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        for t in grads:
            t.grad = None
        n += 1
        if n % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return n


def time_provider(fn, q, k, v, do, layout, block_mask, mode, timing, sustain_s: float = 0.0):
    """Median ms of one provider call (fwd under no_grad, or fwd + backward), after ``sustain_s`` seconds of
    the same call back to back when given (the row's own steady clock instead of whatever ran before)."""
    warmup, rep = timing
    if mode == "fwd":
        with torch.no_grad():
            call = lambda: fn(q, k, v, layout, block_mask)  # noqa: E731
            sustain(call, sustain_s)
            return bench_ms(call, warmup, rep)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    call = lambda: fn(qg, kg, vg, layout, block_mask).backward(do)  # noqa: E731
    sustain(call, sustain_s, (qg, kg, vg))
    return bench_ms(call, warmup, rep, grad_to_none=[qg, kg, vg])


def _time_with_hopper(triton_only: bool, fn, *args):
    """:func:`time_provider`, with the Hopper kernels off for the ``ours-triton`` row."""
    with hopper_off() if triton_only else contextlib.nullcontext():
        return time_provider(fn, *args)


def interleaved_medians(jobs: dict, rounds: int, log=print) -> dict:
    """Run every job (key -> callable returning ms) once per round, the rounds one after another, so each
    provider's samples spread over the whole run instead of one stretch of it; per key ``(median of the
    rounds that succeeded or None, [ms of each])``. A failing round is logged and left out."""
    samples = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            try:
                samples[key].append(job())
            except Exception as e:  # noqa: BLE001 - a failing provider must not end the benchmark
                log(f"{key} failed: {type(e).__name__}: {e}")
    return {key: (statistics.median(v) if v else None, v) for key, v in samples.items()}


def check_against_flex(providers, q, k, v, do, layout, block_mask, calls: int = 2) -> dict:
    """Ours vs FlexAttention on the same mask (bf16): relative RMS of o, dq, dk, dv, the worst of ``calls``
    calls of ours (the first one autotunes; a dense layout takes the full-row loop from the second on)."""
    results = {}
    for name, n in (("flex", 1), ("ours", calls)):
        for _ in range(n):
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = providers[name](qg, kg, vg, layout, block_mask)
            o.backward(do)
            got = (o.detach(), qg.grad, kg.grad, vg.grad)
            if name == "flex":
                ref = got
                continue
            for key, r, x in zip(("o", "dq", "dk", "dv"), ref, got):
                results[key] = max(results.get(key, 0.0), rel_rms(r, x))
    return results


VERIFY_TOL = 2e-2  # relative RMS vs FlexAttention in bf16; a correct kernel measures ~1e-3


def _verified(out: dict) -> bool:
    return all(isinstance(out.get(key), float) and out[key] <= VERIFY_TOL for key in ("o", "dq", "dk", "dv"))


def kernel_picks(triton_fwd, triton_bwd) -> dict:
    """The configs the autotuners last ran (what a check or a timing used)."""
    return {
        "fwd": str(getattr(triton_fwd._block_sparse_fwd_kernel, "best_config", None)),
        "dkdv": str(getattr(triton_bwd._bwd_dkdv, "best_config", None)),
        "dq": str(getattr(triton_bwd._bwd_dq, "best_config", None)),
    }


def tune(providers, triton_fwd, triton_bwd, device) -> list[dict]:
    """Sweep a few variants of each kernel at Wan-480p 25%, each checked against FlexAttention before it is
    timed, and the forward's full-row loop against the index-list loop on a dense layout. Reports only."""
    b, h, s, d = SHAPES["wan"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))
    from dit_sparse.kernels.block_sparse.layout_ops import transpose_layout_tensors

    rows = []
    scale = d ** -0.5

    def reference(layout):
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = providers["flex"](qg, kg, vg, layout, layout.to_flex_block_mask())
        o.backward(do)
        return dict(o=o.detach(), dq=qg.grad, dk=kg.grad, dv=vg.grad)

    def record(kernel, cfg, fn, check, flops, ref):
        row = dict(kernel=kernel, config=list(cfg), ms=None, tflops=None)
        try:
            out = fn()
            row["err"] = {key: rel_rms(ref[key], val) for key, val in zip(check, out)}
            if all(x <= VERIFY_TOL for x in row["err"].values()):
                row["ms"] = bench_ms(fn, 10, 60)
                row["tflops"] = tflops(flops, row["ms"])
            else:
                row["error"] = "mismatch"
        except Exception as e:  # over-sized configs (shared memory) or compile failures are results, not crashes
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
        ms = row["ms"] if row["ms"] is None else round(row["ms"], 3)
        print(f"  tune {kernel:14s} {str(list(cfg)):28s} {ms} ms {row.get('error', '')}", flush=True)

    # Forward: full-row loop vs index-list loop on a dense layout (the winner config).
    dense = random_layout(b, h, s, 1.0, 1, device)
    ref = reference(dense)
    dense_flops = attention_flops(b, h, s, s, d, 1.0, "fwd")
    cfg = triton_fwd.FWD_TUNE_SPACE[0]
    for full in (True, False):
        record(f"fwd-dense-{'full' if full else 'list'}", cfg,
               lambda full=full: triton_fwd.block_sparse_fwd(q, k, v, dense.kv_counts, dense.kv_indices, scale, BLOCK,
                                                             BLOCK, config=cfg, full_rows=full)[:1],
               ("o",), dense_flops, ref)
    dense = ref = None  # free them (the lambdas above ran already)

    layout = random_layout(b, h, s, CHECK_DENSITY, 1, device)
    ref = reference(layout)
    c, i = layout.kv_counts, layout.kv_indices
    qc, qi = transpose_layout_tensors(c, i, layout.num_q_blocks)
    fwd_flops = attention_flops(b, h, s, s, d, layout.density().mean().item(), "fwd")
    for cfg in triton_fwd.FWD_TUNE_SPACE:
        record("fwd", cfg, lambda cfg=cfg: triton_fwd.block_sparse_fwd(q, k, v, c, i, scale, BLOCK, BLOCK,
                                                                       config=cfg, full_rows=False)[:1],
               ("o",), fwd_flops, ref)
    o, lse = triton_fwd.block_sparse_fwd(q, k, v, c, i, scale, BLOCK, BLOCK, config=triton_fwd.FWD_TUNE_SPACE[0],
                                         full_rows=False)
    bwd_flops = 2.5 * fwd_flops

    def bwd(dkdv_cfg, dq_cfg):
        return lambda: triton_bwd.block_sparse_bwd(do, None, q, k, v, o, lse, c, i, qc, qi, scale, BLOCK, BLOCK,
                                                   dkdv_config=dkdv_cfg, dq_config=dq_cfg)

    for cfg in triton_bwd.DKDV_TUNE_SPACE:
        record("dkdv", cfg, bwd(cfg, triton_bwd.DQ_TUNE_SPACE[0]), ("dq", "dk", "dv"), bwd_flops, ref)
    best = _fastest(rows, "dkdv")
    for cfg in triton_bwd.DQ_TUNE_SPACE:
        record("dq", cfg, bwd(tuple(best) if best else triton_bwd.DKDV_TUNE_SPACE[0], cfg), ("dq", "dk", "dv"),
               bwd_flops, ref)
    for kernel, first in (("fwd", triton_fwd.FWD_TUNE_SPACE[0]), ("dkdv", triton_bwd.DKDV_TUNE_SPACE[0]),
                          ("dq", triton_bwd.DQ_TUNE_SPACE[0])):
        fastest = _fastest(rows, kernel)
        note = "" if fastest in (None, list(first)) else "  <- differs from the code's choice; update the lists"
        print(f"  tune fastest {kernel}: {fastest} (code uses {list(first)} where it fits){note}", flush=True)
    return rows


def _fastest(rows, kernel):
    ok = sorted((r for r in rows if r["kernel"] == kernel and r["ms"] is not None), key=lambda r: r["ms"])
    return ok[0]["config"] if ok else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="wan,hunyuan", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--densities", default="0.05,0.1,0.25,0.5,1.0")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--tune", action="store_true", help="sweep our kernel configs at Wan-480p 25%% first")
    p.add_argument("--out", default="benchmarks/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every row this many times, interleaved, and report the median (targets within the "
                        "run-to-run spread need more than one)")
    p.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                   help="before timing a row, run the same call back to back this long, so every row is timed "
                        "at its own sustained clock (H200: 2-3 s reach it) rather than after whatever ran before")
    p.add_argument("--name", default="kernels", help="report file stem in --out (default: kernels)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no GPU run: merge the JSON reports of runs of different shapes into one report")
    args = p.parse_args(argv)
    if args.sustain < 0:
        p.error(f"--sustain must be >= 0, got {args.sustain}")
    if not args.name or os.sep in args.name or args.name.startswith("."):
        p.error(f"--name must be a plain file stem, got {args.name!r}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
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
        f"CUDA {info['cuda']} | cuDNN {info['cudnn']}"
        + (f" | merged from {info['merged_from']} runs, one per shape (`--merge`)" if info.get("merged_from") else ""),
        "",
        f"Kernels of `ours`: forward {info.get('fwd_kernel', 'triton')}, dK/dV {info.get('dkdv_kernel', 'triton')}, "
        f"dQ {info.get('dq_kernel', 'triton')} ("
        + ("delta computed by the Gluon dQ kernel, no preprocess launch" if str(info.get("dq_kernel", "")).startswith(
            "hopper") else "backward preprocess: Triton")
        + ")"
        + ("; Gluon forward schedule: " + ", ".join(f"{k} {v}" for k, v in info["fwd_schedule"].items())
           + " (its consumer warpgroups take turns issuing MMAs where one head's K + V exceed half the L2)"
           if info.get("fwd_schedule") else "")
        + ". `ours-triton` is the portable Triton "
        "kernels on the same inputs "
        "(`DIT_SPARSE_HOPPER_FWD=0 DIT_SPARSE_HOPPER_BWD=0`).",
        "",
        "Effective TFLOP/s = 4*B*H*Sq*Skv*D*density / time for fwd, 3.5x that for fwd+bwd, with density the "
        "ACTUAL kept fraction of the layout (1 for dense cuDNN / FA2). `vs cuDNN` = cuDNN dense time / time "
        "(same mode); `vs Flex` = Flex time / our time on the identical block mask (> 1: we are faster); "
        "`rate/cuDNN` = effective rate / cuDNN dense rate. "
        f"ms: median of {info.get('rounds', 1)} interleaved round(s) (each round's ms in the JSON, `ms_rounds`)"
        + (f"; before each timing the same call ran back to back for {info['sustain_s']:g} s, so every row is "
           "timed at its own sustained clock." if info.get("sustain_s") else "."),
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
        lines += ["", "## Variant sweep (Wan-480p, 25%; fwd-dense-*: 100% with the full-row / index-list loop; fwd "
                  "config = BLOCK_N, warps, stages, tma; dkdv = N1, M1, warps, stages, tma; dq = M2, N2, warps, "
                  "stages, tma; ms = fwd or whole bwd)", "",
                  markdown_table(["kernel", "config", "ms", "TFLOP/s", "max rel err", "error"],
                                 [[r["kernel"], str(r["config"]), r["ms"], r["tflops"],
                                   max(r["err"].values()) if r.get("err") else None, r.get("error")]
                                  for r in tune_rows])]
    return "\n".join(lines)


# Environment fields two runs must share to be merged into one report (the GPU, the software, the method).
SAME_FOR_MERGE = ("gpu", "torch", "triton", "cuda", "cudnn", "rounds", "sustain_s", "fwd_kernel", "dkdv_kernel",
                  "dq_kernel")


def merge_reports(payloads: list[dict]) -> dict:
    """One report from runs of different shapes (e.g. one shape per GPU of a host, run at the same time):
    rows, checks and schedules concatenated, the dates of all runs kept (each distinct one once). Raises
    ``ValueError`` when the runs differ in GPU, versions or method, or share a shape."""
    if len(payloads) < 2:
        raise ValueError("--merge needs at least two JSON reports")
    first = payloads[0]["env"]
    for p in payloads[1:]:
        diff = [k for k in SAME_FOR_MERGE if p["env"].get(k) != first.get(k)]
        if diff:
            raise ValueError(f"runs differ in {', '.join(diff)}; only runs of one GPU, versions and method merge")
    shapes = [s for p in payloads for s in p["args"]["shapes"]]
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"runs share a shape ({shapes}); merge runs of different shapes")
    dates = list(dict.fromkeys(p["env"]["date"] for p in payloads))  # runs started in the same minute: once
    env = dict(first, date="; ".join(dates), merged_from=len(payloads))
    env["fwd_schedule"] = {k: v for p in payloads for k, v in p["env"].get("fwd_schedule", {}).items()}
    return dict(env=env, args=dict(payloads[0]["args"], shapes=shapes),
                rows=[r for p in payloads for r in p["rows"]],
                checks={k: v for p in payloads for k, v in p["checks"].items()},
                tune=[r for p in payloads for r in p.get("tune", [])], best_configs=payloads[0].get("best_configs", {}),
                elapsed_s=[p.get("elapsed_s") for p in payloads])


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        try:
            payloads = []
            for path in args.merge:
                with open(path) as f:
                    payloads.append(json.load(f))
            merged = merge_reports(payloads)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"bench_kernels.py --merge: {e}")
        md = build_markdown(merged["env"], merged["rows"], merged["checks"], merged["tune"], merged["best_configs"])
        print("wrote", *write_report(args.out, args.name, merged, md))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    device = "cuda"
    block_sparse_attention, triton_fwd, triton_bwd = _import_kernels()
    info = env_info()
    info["rounds"] = args.rounds
    info["sustain_s"] = args.sustain
    print(f"# {info}", flush=True)
    t_start = time.time()
    providers = make_providers(block_sparse_attention)
    tune_rows = tune(providers, triton_fwd, triton_bwd, device) if args.tune else []
    rows, checks = [], {}

    def save():
        best = kernel_picks(triton_fwd, triton_bwd)
        payload = dict(env=info, args=vars(args), rows=rows, checks=checks, tune=tune_rows, best_configs=best,
                       elapsed_s=round(time.time() - t_start, 1))
        write_report(args.out, args.name, payload, build_markdown(info, rows, checks, tune_rows, best))

    for shape in args.shapes:
        b, h, s, d = SHAPES[shape]
        timing = TIMING[shape]
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4))
        info.update(kernel_names(q))
        if info["fwd_kernel"] != "triton":
            from dit_sparse.kernels.block_sparse.hopper_fwd import pingpong_wanted

            info.setdefault("fwd_schedule", {})[shape] = "ping-pong" if pingpong_wanted(k) else "free"
        hopper = any(info[f"{x}_kernel"] != "triton" for x in ("fwd", "dkdv", "dq"))
        layouts = {x: random_layout(b, h, s, x, args.seed + 1 + j, device) for j, x in enumerate(args.densities)}
        masks = {x: layout.to_flex_block_mask() for x, layout in layouts.items()}  # the same masks for Flex
        # Check every layout we time first (the first check also runs our autotuners); a variant that
        # disagrees with FlexAttention is reported and not timed.
        bad = set()
        for x in sorted(layouts, key=lambda x: x != CHECK_DENSITY):  # autotune at the representative density
            layout = layouts[x]
            key = f"{shape}@{x:g}"
            try:
                checks[key] = check_against_flex(providers, q, k, v, do, layout, masks[x])
                if not _verified(checks[key]):
                    bad.add(x)
                    picks = kernel_picks(triton_fwd, triton_bwd)
                    checks[key]["error"] = "above tolerance with " + " | ".join(f"{n}: {c}" for n, c in picks.items())
            except Exception:
                traceback.print_exc()
                checks[key] = {"error": traceback.format_exc(limit=1).strip().splitlines()[-1]}
                bad.add(x)
            print(f"[{shape}] check vs flex d={x:g}: {checks[key]}", flush=True)
        jobs = None  # holds q, k, v, do: dropped with them below
        for mode in args.modes:
            # "ours-triton": "ours" with the Hopper kernels off (the portable Triton kernels), where they apply
            names = ("flex", "ours") + (("ours-triton",) if hopper else ())
            jobs = {(name, None): functools.partial(time_provider, providers[name], q, k, v, do, None, None, mode,
                                                    timing, args.sustain) for name in ("cudnn", "fa2")}
            for x, layout in layouts.items():
                for name in names:
                    if name.startswith("ours") and x in bad:
                        continue
                    jobs[(name, x)] = functools.partial(
                        _time_with_hopper, name == "ours-triton", providers["ours" if name == "ours-triton" else name],
                        q, k, v, do, layout, masks[x], mode, timing, args.sustain)
            timed = interleaved_medians(jobs, args.rounds, log=lambda m: print(f"[{shape}] {mode} {m}", flush=True))
            base_ms = timed[("cudnn", None)][0]
            base_rate = tflops(attention_flops(b, h, s, s, d, 1.0, mode), base_ms) if base_ms else None
            for name in ("cudnn", "fa2"):
                ms, rounds = timed[(name, None)]
                rate = tflops(attention_flops(b, h, s, s, d, 1.0, mode), ms) if ms else None
                rows.append(dict(shape=shape, mode=mode, provider=name, density=1.0, ms=ms, tflops=rate,
                                 speedup_vs_cudnn=base_ms / ms if ms and base_ms else None, ratio_vs_flex=None,
                                 rate_vs_cudnn=rate / base_rate if rate and base_rate else None, ms_rounds=rounds))
            for x, layout in layouts.items():
                actual = layout.density().mean().item()
                times = {name: timed.get((name, x), (None, []))[0] for name in names}
                for name, ms in times.items():
                    rate = tflops(attention_flops(b, h, s, s, d, actual, mode), ms) if ms else None
                    flex_ms = times.get("flex")
                    rows.append(dict(
                        shape=shape, mode=mode, provider=name, density=round(actual, 4), ms=ms, tflops=rate,
                        speedup_vs_cudnn=base_ms / ms if ms and base_ms else None,
                        ratio_vs_flex=flex_ms / ms if (name != "flex" and ms and flex_ms) else None,
                        rate_vs_cudnn=rate / base_rate if rate and base_rate else None,
                        ms_rounds=timed.get((name, x), (None, []))[1],
                    ))
                print(f"[{shape}] {mode} d={actual:.3f} " + " ".join(f"{n}={t}" for n, t in times.items())
                      + f" ({time.time() - t_start:.0f}s)", flush=True)
            save()
        del q, k, v, do, layouts, jobs, masks
        torch.cuda.empty_cache()
    save()

    print("\nshape   mode    provider density      ms  TFLOP/s vsCuDNN vsFlex rate/cuDNN")
    for r in rows:
        f = lambda x, w, p: f"{x:{w}.{p}f}" if isinstance(x, float) else f"{'-':>{w}}"  # noqa: E731
        print(f"{r['shape']:7s} {r['mode']:7s} {r['provider']:11s} {r['density']:7.3f} {f(r['ms'], 8, 2)} "
              f"{f(r['tflops'], 8, 0)} {f(r['speedup_vs_cudnn'], 7, 2)} {f(r['ratio_vs_flex'], 6, 2)} "
              f"{f(r['rate_vs_cudnn'], 9, 2)}")
    print(f"checks: {checks}")
    print("picks: " + " | ".join(f"{n} {c}" for n, c in kernel_picks(triton_fwd, triton_bwd).items()))
    print(f"total {time.time() - t_start:.0f}s; wrote {os.path.join(args.out, args.name + '.md')}")


if __name__ == "__main__":
    main()
