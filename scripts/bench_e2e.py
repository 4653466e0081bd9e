"""End-to-end speed of dit-sparse presets against dense cuDNN attention (GPU only).

Wan 2.1 1.3B config (random bf16 weights) at 480p, 81 frames (latents 1x16x21x60x104, text 512 x 4096),
through a 50-step FlowMatch timestep schedule: only the transformer calls, CFG off, batch 1. Dense
runs the stock processors with SDPA pinned to cuDNN; each preset runs through
``apply_sparse_attention`` (its dense warm-up steps use the same cuDNN SDPA). Then the HunyuanVideo
config at 720p (129 frames: latents 1x16x33x90x160) for one step, dense vs each preset forced sparse
(``dense_steps=0``): the time of one sparse step (block reuse, which ``fast`` and ``turbo`` use, needs
more than one step, so it does not show there).

Writes ``benchmarks/e2e.json`` and ``benchmarks/e2e.md`` (GPU, date, versions, time per step, total,
speedup), each written to a temporary name and renamed.

    python scripts/bench_e2e.py                       # everything (~5 minutes on an H200)
    python scripts/bench_e2e.py --steps 10 --skip-hunyuan
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import env_info  # noqa: E402

from dit_sparse._atomic import atomic_write_text  # noqa: E402

PRESETS = ("quality", "balanced", "fast", "turbo")
WAN_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)
HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)


def _versions() -> dict:
    """Library versions from :func:`_bench_util.env_info`, plus diffusers, in the order e2e.md lists them."""
    import diffusers

    env = env_info()
    return {"python": env["python"], "torch": env["torch"], "diffusers": diffusers.__version__,
            "cuda": env["cuda"], "cudnn": env["cudnn"], "triton": env["triton"]}


def _build(cls, config: dict, seed: int = 0):
    """Random-weight model created directly on the GPU in bf16."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = cls(**config)
    finally:
        torch.set_default_dtype(old)
    return model.to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)


def _cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


def _timesteps(steps: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(steps, device="cuda")
    return sched.timesteps


def _run_steps(model, inputs: dict, timesteps) -> list[float]:
    """Per-step seconds (CUDA events) of one transformer call per timestep."""
    events = []
    torch.cuda.synchronize()
    for t in timesteps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inputs, timestep=t.expand(1), return_dict=False)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1000.0 for s, e in events]


def _summary(step_times: list[float]) -> dict:
    return {"time_per_step_s": sum(step_times) / len(step_times), "total_s": sum(step_times),
            "steps": len(step_times), "step_times_s": [round(t, 5) for t in step_times]}


def _preset_run(model, inputs, timesteps, name: str, num_steps: int, **overrides) -> dict:
    from dit_sparse.apply import apply_sparse_attention, remove_sparse_attention
    from dit_sparse.config import SparseAttentionConfig

    # Warm-up (kernel compilation / autotuning), forced sparse, not timed.
    apply_sparse_attention(model, SparseAttentionConfig.preset(name, dense_steps=0), num_steps=1)
    _run_steps(model, inputs, timesteps[:1])
    remove_sparse_attention(model)
    cfg = SparseAttentionConfig.preset(name, **overrides)
    apply_sparse_attention(model, cfg, num_steps=num_steps)
    try:
        times = _run_steps(model, inputs, timesteps)
        stats = model.sparse_attention_stats()
    finally:
        remove_sparse_attention(model)
    out = _summary(times)
    out.update(config=cfg.to_dict(), density=stats["density"], effective_density=stats["effective_density"],
               calls=stats["calls"], cache_hits=stats["cache"]["hits"], cache_misses=stats["cache"]["misses"],
               block_reuse=stats["block_reuse"])
    return out


def _blocks_reused(run: dict) -> str:
    """Fraction of transformer block calls that were reused, for the table ("-": attention-only preset)."""
    blocks = (run.get("block_reuse") or {}).get("blocks")
    if not blocks:
        return "-"
    total = blocks["computed"] + blocks["reused"]
    return f"{blocks['reused'] / total:.2f}" if total else "-"


def bench_wan(steps: int, presets) -> dict:
    from diffusers import WanTransformer3DModel

    model = _build(WanTransformer3DModel, WAN_13B)
    g = torch.Generator("cuda").manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
    }
    timesteps = _timesteps(steps)
    result = {"model": "Wan2.1-1.3B config, random bf16 weights", "latents": [1, 16, 21, 60, 104],
              "text_tokens": 512, "tokens": 21 * 30 * 52, "steps": steps, "cfg": False}
    with torch.no_grad(), _cudnn():
        _run_steps(model, inputs, timesteps[:1])  # warm-up
        result["dense"] = _summary(_run_steps(model, inputs, timesteps))
        print(f"wan dense: {result['dense']['time_per_step_s']:.3f} s/step", flush=True)
        result["presets"] = {}
        for name in presets:
            r = _preset_run(model, inputs, timesteps, name, steps)
            r["speedup"] = result["dense"]["total_s"] / r["total_s"]
            result["presets"][name] = r
            print(f"wan {name}: {r['time_per_step_s']:.3f} s/step, speedup {r['speedup']:.2f}x, "
                  f"density {r['density']:.3f}", flush=True)
    del model
    torch.cuda.empty_cache()
    return result


def bench_hunyuan(presets) -> dict:
    from diffusers import HunyuanVideoTransformer3DModel

    model = _build(HunyuanVideoTransformer3DModel, HUNYUAN)
    g = torch.Generator("cuda").manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 33, 90, 160, device="cuda", dtype=torch.bfloat16, generator=g),
        "encoder_hidden_states": torch.randn(1, 256, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
        "encoder_attention_mask": torch.ones(1, 256, device="cuda", dtype=torch.bool),
        "pooled_projections": torch.randn(1, 768, device="cuda", dtype=torch.bfloat16, generator=g),
        "guidance": torch.tensor([6016.0], device="cuda", dtype=torch.bfloat16),
    }
    inputs["encoder_attention_mask"][:, 200:] = False
    timesteps = torch.tensor([900.0], device="cuda")
    result = {"model": "HunyuanVideo config, random bf16 weights", "latents": [1, 16, 33, 90, 160],
              "text_tokens": 256, "tokens": 33 * 45 * 80 + 256, "steps": 1,
              "note": "one step; presets forced sparse (dense_steps=0): the time of a sparse step"}
    with torch.no_grad(), _cudnn():
        _run_steps(model, inputs, timesteps)  # warm-up
        result["dense"] = _summary(_run_steps(model, inputs, timesteps))
        print(f"hunyuan dense: {result['dense']['time_per_step_s']:.3f} s/step", flush=True)
        result["presets"] = {}
        for name in presets:
            r = _preset_run(model, inputs, timesteps, name, 1, dense_steps=0)
            r["speedup"] = result["dense"]["total_s"] / r["total_s"]
            result["presets"][name] = r
            print(f"hunyuan {name}: {r['time_per_step_s']:.3f} s/step, speedup {r['speedup']:.2f}x", flush=True)
    del model
    torch.cuda.empty_cache()
    return result


def _markdown(report: dict) -> str:
    lines = [
        "# End-to-end speed: dit-sparse presets vs dense cuDNN attention",
        "",
        f"GPU: {report['gpu']}  ",
        f"Date: {report['date']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    for key in ("wan", "hunyuan"):
        r = report.get(key)
        if r is None:
            continue
        lines += [f"## {r['model']}", "", f"latents {r['latents']}, {r['tokens']} tokens, {r['steps']} step(s)"
                  + (f"; {r['note']}" if "note" in r else ""), "",
                  "| run | time / step (s) | total (s) | speedup | density | blocks reused |",
                  "|---|---|---|---|---|---|",
                  f"| dense cuDNN | {r['dense']['time_per_step_s']:.3f} | {r['dense']['total_s']:.2f} | 1.00x | 1.000 | - |"]
        for name, p in r["presets"].items():
            lines.append(f"| {name} | {p['time_per_step_s']:.3f} | {p['total_s']:.2f} | {p['speedup']:.2f}x | "
                         f"{p['density']:.3f} | {_blocks_reused(p)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="Wan denoising steps (default 50)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--skip-wan", action="store_true")
    parser.add_argument("--skip-hunyuan", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_e2e.py needs a CUDA GPU")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    report = {"gpu": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": _versions()}
    t0 = time.perf_counter()
    if not args.skip_wan:
        report["wan"] = bench_wan(args.steps, presets)
    if not args.skip_hunyuan:
        report["hunyuan"] = bench_hunyuan(presets)
    report["wall_s"] = time.perf_counter() - t0
    # Not _bench_util.write_report: it strips the trailing blank line that e2e.md has always ended with.
    atomic_write_text(os.path.join(args.out, "e2e.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "e2e.md"), _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
