"""Multi-GPU benchmark: dit-sparse under diffusers' Ulysses context parallelism, 1 vs N GPUs.

Transformers are built from their published configs with random weights (no downloads) in bf16 and
run a short denoising loop on random latents / text embeddings (Euler updates, descending timesteps,
so schedules with dense warm-up and block reuse behave as in a pipeline):

* Wan 2.1 1.3B, 480p (81 frames 480x832 -> 32,760 tokens): ``dense`` (stock attention) and the ``fast``
  preset, on 1 and on N GPUs (``--gpus``, default 2);
* HunyuanVideo 13B, 720p (129 frames 720x1280 -> 118,800 video tokens + 256 text tokens, the last 156
  of them padding, as a pipeline pads a short prompt), one step: ``dense`` (stock attention) and ``fast``
  with ``dense_steps=0``, on 1 and on N GPUs. diffusers 0.42 ships no HunyuanVideo cp plan;
  ``dit_sparse.parallel.enable_ulysses`` uses dit-sparse's (``HUNYUAN_VIDEO_CP_PLAN``, plus the hook that
  cuts the text padding mask per rank), under which both the stock processor and dit-sparse's are exact.

For every run: transformer wall time of the timed loop (after one untimed warm-up loop), peak memory,
and for N GPUs the output's relative RMS difference to the 1-GPU output of the same preset and the
speed-up. Writes ``benchmarks/multigpu.json`` and ``benchmarks/multigpu.md`` (temp file + rename).
NVLink multicast stays off in every launched process (``dit_sparse.parallel.NCCL_ENV``).

    python scripts/bench_multigpu.py --gpus 2 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch

from dit_sparse import parallel

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# (model, latent [C, F, H, W], text tokens) at the benchmark sizes
CASES = {
    "wan2.1-1.3b-480p": ("wan", (16, 21, 60, 104), 512),
    "hunyuanvideo-720p": ("hunyuan_video", (16, 33, 90, 160), 256),
}
HUNYUAN_VALID_TEXT = 100  # valid prompt tokens of the 256 (the rest is padding the key mask hides)
TOLERANCE = 2e-2  # relative RMS, bf16 over a few steps


def _build(kind: str, device):
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 13B parameters: initialise in bf16, directly on the GPU
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**WAN_1_3B) if kind == "wan" else HunyuanVideoTransformer3DModel()
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _inputs(kind: str, latent_shape, text_len: int, device):
    g = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(1, *latent_shape, generator=g).to(device, torch.bfloat16)
    text = torch.randn(1, text_len, 4096, generator=g).to(device, torch.bfloat16)
    extra = {}
    if kind == "hunyuan_video":
        mask = torch.zeros(1, text_len, device=device, dtype=torch.bool)
        mask[:, :HUNYUAN_VALID_TEXT] = True
        extra = {"encoder_attention_mask": mask,
                 "pooled_projections": torch.randn(1, 768, generator=g).to(device, torch.bfloat16),
                 "guidance": torch.tensor([6000.0], device=device)}
    return latents, text, extra


def _loop(model, latents, text, extra, steps: int):
    timesteps = torch.linspace(999, 0, steps + 1)[:-1]
    x = latents
    with torch.no_grad():
        for t in timesteps:
            v = model(hidden_states=x, timestep=t.view(1).to(x.device), encoder_hidden_states=text,
                      return_dict=False, **extra)[0]
            x = x - v / steps
    return x


def _config(preset: str, one_step: bool):
    from dit_sparse.presets import preset_config

    return preset_config(preset, dense_steps=0) if one_step else preset_config(preset)


def _bench_rank(rank: int, world: int, name: str, preset: str, steps: int, result_dir: str) -> None:
    from dit_sparse.apply import apply_sparse_attention

    kind, latent_shape, text_len = CASES[name]
    device = torch.device("cuda", rank)
    model = _build(kind, device)
    if world > 1:
        parallel.enable_ulysses(model, world)
    if preset != "dense":
        apply_sparse_attention(model, _config(preset, steps == 1), num_steps=steps)
    latents, text, extra = _inputs(kind, latent_shape, text_len, device)
    _loop(model, latents, text, extra, steps)  # warm-up: kernel compilation, layout cache
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = _loop(model, latents, text, extra, steps)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if rank != 0:
        return
    stats = model.sparse_attention_stats() if hasattr(model, "sparse_attention_stats") else None
    result = {
        "case": name, "preset": preset, "gpus": world, "steps": steps, "seconds": seconds,
        "seconds_per_step": seconds / steps, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "density": None if stats is None else stats["density"],
        "effective_density": None if stats is None else stats["effective_density"],
    }
    stem = os.path.join(result_dir, f"{name}_{preset}_{world}")
    torch.save(out.float().cpu(), stem + ".pt")
    with open(stem + ".json", "w") as f:
        json.dump(result, f)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".multigpu.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _markdown(report: dict) -> str:
    lines = [
        "# Multi-GPU (Ulysses context parallelism)", "",
        f"{report['gpu']}, {report['date']}; bf16, random weights from the published configs; "
        f"diffusers {report['versions']['diffusers']}, torch {report['versions']['torch']}.", "",
        "| case | preset | GPUs | steps | s/step | speed-up vs 1 GPU | rel. RMS vs 1 GPU | density | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)
        lines.append(
            f"| {r['case']} | {r['preset']} | {r['gpus']} | {r['steps']} | {r['seconds_per_step']:.2f} | "
            f"{fmt(r.get('speedup_vs_1gpu'), '.2f')} | {fmt(r.get('rel_rms_vs_1gpu'), '.1e')} | "
            f"{fmt(r['density'], '.2f')} | {r['peak_memory_gib']:.1f} |"
        )
    for note in report["notes"]:
        lines += ["", f"* {note}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the parallel runs (default 2)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps of the Wan runs (default 8)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--out", default="benchmarks/multigpu", help="output stem (.json and .md are written)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        print(f"needs {args.gpus} CUDA GPUs; found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    for k, v in parallel.NCCL_ENV.items():
        os.environ[k] = v
    runs, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            if name not in CASES:
                print(f"unknown case '{name}'; choose from {', '.join(CASES)}", file=sys.stderr)
                return 2
            kind = CASES[name][0]
            steps = args.steps if kind == "wan" else 1
            counts = (1, args.gpus) if kind in parallel.ULYSSES_FAMILIES else (1,)
            if kind not in parallel.ULYSSES_FAMILIES:
                notes.append(f"{name}: {kind} is not run on {args.gpus} GPUs: dit-sparse does not support it "
                             f"under context parallelism")
            if kind == "hunyuan_video":
                notes.append(f"{name}: one step (fast with dense_steps=0); {HUNYUAN_VALID_TEXT} of "
                             f"{CASES[name][2]} text tokens valid (padded prompt); on {args.gpus} GPUs with "
                             f"dit-sparse's cp plan (parallel.HUNYUAN_VIDEO_CP_PLAN; diffusers 0.42 has none)")
            for preset in ("dense", "fast"):
                for world in counts:
                    parallel.launch(_bench_rank, world, name, preset, steps, tmp)
                    stem = os.path.join(tmp, f"{name}_{preset}_{world}")
                    with open(stem + ".json") as f:
                        r = json.load(f)
                    if world > 1:
                        one = torch.load(os.path.join(tmp, f"{name}_{preset}_1.pt"))
                        r["rel_rms_vs_1gpu"] = _rel_rms(torch.load(stem + ".pt"), one)
                        r["equal_within_tolerance"] = r["rel_rms_vs_1gpu"] <= TOLERANCE
                        base = next(x for x in runs if x["case"] == name and x["preset"] == preset and x["gpus"] == 1)
                        r["speedup_vs_1gpu"] = base["seconds"] / r["seconds"]
                    runs.append(r)
                    print(json.dumps(r), flush=True)
    import diffusers

    report = {
        "gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "tolerance_rel_rms": TOLERANCE, "runs": runs, "notes": notes,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "env": dict(parallel.NCCL_ENV),
    }
    _write_atomic(args.out + ".json", json.dumps(report, indent=2) + "\n")
    _write_atomic(args.out + ".md", _markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
