"""GPU benchmark of sparse-linear attention (SLA) against dense cuDNN / FA2 SDPA and FlexAttention.

Shape Wan-480p (B1 H12 S32760 D128, bf16), 5% and 10% critical 128x128 blocks per query block (random
blocks, the same mask for FlexAttention, which computes only the sparse part). Times forward and
forward+backward of every provider, after checking ours once at the real shape: ``o_sparse`` against
FlexAttention, ``o_linear`` and dq / dk / dv against the PyTorch backend (fp32). Writes
``<out>/sla.json`` and ``<out>/sla.md`` (GPU, date, versions, ms and speed-up ratios) and prints the table.

Targets: forward >= 15x faster than FA2 and >= 9x than cuDNN; forward+backward >= 6x faster than cuDNN.

    pip install -e .            # dit_sparse importable, with its kernels
    python scripts/bench_sla.py [--out benchmarks] [--densities 0.05,0.1] [--no-check]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

from _bench_util import bench_ms, env_info, markdown_table, rel_rms, write_report  # noqa: E402

SHAPE = (1, 12, 32760, 128)  # Wan 2.1 480p: 21 x 30 x 52 latent tokens, 12 heads of 128
BLOCK = 128
TIMING = (25, 100)  # warm-up / repetition ms per measurement
TARGETS = {("fwd", "fa2"): 15.0, ("fwd", "cudnn"): 9.0, ("fwdbwd", "cudnn"): 6.0}
CHECK_TOL = 2e-2  # relative RMS in bf16; a correct kernel measures ~1e-3
DEVICE = "cuda"
DTYPE = torch.bfloat16


def random_layout(b, h, seq, density, seed, device):
    """Every query block keeps ``max(1, round(density * Mk))`` random key blocks, its own block included."""
    from dit_sparse import BlockLayout

    m = math.ceil(seq / BLOCK)
    keep = max(1, min(m, round(density * m)))
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(b, h, m, m, generator=g, device=device)
    scores += 2.0 * torch.eye(m, device=device)  # the diagonal block always wins
    mask = torch.zeros(b, h, m, m, dtype=torch.bool, device=device)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return BlockLayout.from_block_mask_tensor(mask, seq, seq, BLOCK, BLOCK)


def flex_block_mask(layout):
    """FlexAttention mask of the same blocks. Built from a mask_mod rather than from the block lists so
    FlexAttention masks the keys past the sequence end itself (S = 32760 is not a multiple of 128)."""
    from torch.nn.attention.flex_attention import create_block_mask

    blocks = layout.to_block_mask_tensor()[0]  # [H, Mq, Mk]

    def critical(b, h, q_idx, kv_idx):
        return blocks[h, q_idx // BLOCK, kv_idx // BLOCK]

    return create_block_mask(critical, 1, layout.heads, layout.q_len, layout.kv_len, device=blocks.device,
                             BLOCK_SIZE=BLOCK, _compile=blocks.is_cuda)


def make_providers():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from dit_sparse.kernels.sparse_linear import sparse_linear_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def sdpa(backend):
        def run(q, k, v, layout, block_mask):
            with sdpa_kernel(backend):
                return (F.scaled_dot_product_attention(q, k, v),)

        return run

    return {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "fa2": sdpa(SDPBackend.FLASH_ATTENTION),
        "flex": lambda q, k, v, layout, block_mask: (flex(q, k, v, block_mask=block_mask),),
        "sla": lambda q, k, v, layout, block_mask: sparse_linear_attention(q, k, v, layout, backend="triton"),
    }


def time_provider(fn, q, k, v, do, layout, block_mask, mode) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return bench_ms(lambda: fn(q, k, v, layout, block_mask), *TIMING)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

    def step():
        outs = fn(qg, kg, vg, layout, block_mask)
        torch.autograd.backward(outs, (do,) * len(outs))

    return bench_ms(step, *TIMING, grad_to_none=[qg, kg, vg])


def check(providers, q, k, v, do, layout, block_mask) -> dict:
    """Ours against FlexAttention (o_sparse) and the PyTorch backend (o_linear, dq, dk, dv), relative RMS."""
    from dit_sparse.kernels.sparse_linear import sparse_linear_attention_torch

    flex_o = providers["flex"](q, k, v, layout, block_mask)[0]
    grads = []
    results = []
    for fn in (lambda a, b, c: providers["sla"](a, b, c, layout, block_mask),
               lambda a, b, c: sparse_linear_attention_torch(a.float(), b.float(), c.float(), layout)):
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        o_s, o_l = fn(qg, kg, vg)
        torch.autograd.backward((o_s, o_l), (do.to(o_s.dtype), do.to(o_l.dtype)))
        results.append((o_s.detach(), o_l.detach()))
        grads.append((qg.grad, kg.grad, vg.grad))
        del qg, kg, vg, o_s, o_l
    out = {
        "o_sparse_vs_flex": rel_rms(flex_o, results[0][0]),
        "o_linear_vs_torch": rel_rms(results[1][1], results[0][1]),
    }
    for name, ref, got in zip(("dq", "dk", "dv"), grads[1], grads[0]):
        out[f"{name}_vs_torch"] = rel_rms(ref, got)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(_HERE), "benchmarks"))
    parser.add_argument("--densities", default="0.05,0.1", help="fractions of critical key blocks")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_sla.py needs a CUDA GPU", file=sys.stderr)
        return 2
    densities = [float(x) for x in args.densities.split(",")]
    device = DEVICE
    start = time.time()
    b, h, s, d = SHAPE
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g, device=device, dtype=DTYPE) for _ in range(4))
    providers = make_providers()

    rows, results, checks = [], [], {}
    for density in densities:
        layout = random_layout(1, h, s, density, seed=1, device=device)
        block_mask = flex_block_mask(layout)
        kept = layout.density().mean().item()
        if not args.no_check and density == densities[0]:
            checks = check(providers, q, k, v, do, layout, block_mask)
            print(f"check at density {density}: " + ", ".join(f"{k_}={v_:.2e}" for k_, v_ in checks.items()),
                  flush=True)
        for mode in ("fwd", "fwdbwd"):
            times = {}
            for name, fn in providers.items():
                if name in ("cudnn", "fa2") and density != densities[0]:
                    times[name] = next(r["ms"] for r in results if r["provider"] == name and r["mode"] == mode)
                    continue
                try:
                    times[name] = time_provider(fn, q, k, v, do, layout, block_mask, mode)
                except Exception as err:  # a provider missing on this GPU / build is a result, not a crash
                    times[name] = None
                    print(f"  {name} {mode} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                results.append(dict(provider=name, mode=mode, density=density, kept=kept, ms=times[name]))
                print(f"  density {density:.2f} {mode:6s} {name:6s} {times[name]} ms", flush=True)
            ours = times["sla"]
            ratio = {p: (times[p] / ours if ours and times.get(p) else None) for p in ("cudnn", "fa2", "flex")}
            met = all(ratio[p] is not None and ratio[p] >= t for (m, p), t in TARGETS.items() if m == mode)
            rows.append([f"{density:.0%}", mode, times["cudnn"], times["fa2"], times["flex"], ours,
                         ratio["cudnn"], ratio["fa2"], ratio["flex"], "yes" if met else "no"])

    env = env_info()
    headers = ["critical", "mode", "cuDNN dense ms", "FA2 dense ms", "Flex sparse ms", "SLA ms",
               "x cuDNN", "x FA2", "x Flex", "target met"]
    table = markdown_table(headers, rows)
    md = "\n".join([
        "# Sparse-linear attention (SLA) kernel benchmark",
        "",
        f"GPU {env.get('gpu')}, {env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}.",
        f"Wan-480p self-attention: B{b} H{h} S{s} D{d}, bf16, {BLOCK}x{BLOCK} blocks, random critical blocks "
        "(diagonal included). SLA = exact attention on the critical blocks + linear attention on all others "
        "(feature map softmax); Flex computes only the critical blocks; cuDNN / FA2 are dense.",
        "Ratios are speed-ups of SLA (x N = N times faster). Targets: fwd >= 15x FA2 and >= 9x cuDNN, "
        "fwd+bwd >= 6x cuDNN.",
        "",
        table,
        "",
        "Check (relative RMS, bf16): " + (", ".join(f"{k_} {v_:.2e}" for k_, v_ in checks.items()) or "skipped"),
    ])
    payload = {"env": env, "shape": dict(zip("BHSD", SHAPE)), "block": BLOCK, "targets": {
        f"{m}_vs_{p}": t for (m, p), t in TARGETS.items()}, "results": results, "check": checks,
        "check_ok": all(x <= CHECK_TOL for x in checks.values()) if checks else None,
        "seconds": round(time.time() - start, 1)}
    json_path, md_path = write_report(args.out, "sla", payload, md)
    print(table)
    print(f"wrote {json_path} and {md_path} in {payload['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
