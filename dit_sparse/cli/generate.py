"""``dit-sparse generate``: one video from a prompt with a speed preset, plus a JSON report.

``--gpus N`` spreads the generation over N processes (one per GPU, NCCL; gloo on CPU) with diffusers'
Ulysses context parallelism (``dit_sparse/parallel.py``); every rank computes the same video and rank 0
writes the outputs.
"""

from __future__ import annotations

import argparse
import math
import time

from .errors import FAILURE, CLIError
from .options import add_generation_options, add_preset_option, positive_int, settings_from_args
from .outputs import OutputSet, write_json
from .presets_cmd import measured_speedup
from .report import clean_for_json
from .run import check_video_size, generate, load, note_prompt, resolve_preset, versions

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a video from a prompt with a speed preset",
        description="Generate a video with sparse attention. Defaults fit the embedded default model on CPU.",
    )
    add_generation_options(p)
    add_preset_option(p)
    p.add_argument("--out", required=True, help="output video (.mp4)")
    p.add_argument("--report", default=None, help="also write a JSON report (settings, timings, stats, versions)")
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="spread one generation over this many GPUs with Ulysses context parallelism "
                        "(one process each; on CPU: processes with gloo). Default 1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    resolve_preset(args.preset)  # unknown preset: fail before anything loads
    _declare_outputs(args)[0].check()
    note_prompt(settings)
    if getattr(args, "gpus", 1) > 1:
        return _run_parallel(args, settings)
    return _run_rank(args, settings)


def _declare_outputs(args):
    """(OutputSet, video path, report path or None)."""
    outputs = OutputSet()
    video_path = outputs.add(args.out, (".mp4",), "--out")
    report_path = outputs.add(args.report, (".json",), "--report") if args.report else None
    return outputs, video_path, report_path


def _run_parallel(args: argparse.Namespace, settings) -> int:
    """``--gpus N``: N spawned ranks (``dit_sparse.parallel.launch``); a failing rank becomes a CLIError."""
    import torch

    from dit_sparse import parallel

    if settings.resolved_device().startswith("cuda") and args.gpus > torch.cuda.device_count():
        raise CLIError(f"--gpus {args.gpus} asked but only {torch.cuda.device_count()} GPUs are visible")
    if settings.cpu_offload:
        raise CLIError("--cpu-offload cannot be combined with --gpus; each GPU holds its own copy of the model")
    try:
        parallel.launch(_rank_main, args.gpus, args)
    except Exception as e:  # the rank's traceback text; its last line names the error
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise CLIError(f"--gpus {args.gpus}: {lines[-1] if lines else type(e).__name__}", code=FAILURE) from e
    return 0


def _rank_main(rank: int, world: int, args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    if settings.resolved_device().startswith("cuda"):
        settings.device = f"cuda:{rank}"
    if rank != 0:
        args.no_progress = True
    _run_rank(args, settings, rank=rank, world=world)


def _run_rank(args: argparse.Namespace, settings, rank: int = 0, world: int = 1) -> int:
    """Load, generate and (rank 0 only) write; ``world > 1``: one rank of a context-parallel run."""
    outputs, video_path, report_path = _declare_outputs(args)
    with outputs:
        t0 = time.perf_counter()
        pipe = load(settings)
        load_s = time.perf_counter() - t0
        check_video_size(pipe, settings)
        if world > 1:
            _enable_parallel(pipe, world)
        result = generate(pipe, settings, args.preset, progress=not args.no_progress)
        if rank != 0:
            return 0

        from dit_sparse.pipelines.video import write_video

        t0 = time.perf_counter()
        write_video(result.frames, outputs.temp(video_path), fps=settings.fps)
        write_s = time.perf_counter() - t0
        if report_path is not None:
            write_json(outputs.temp(report_path), clean_for_json({
                "command": "generate",
                "preset": args.preset,
                "settings": settings.to_dict(),
                "gpus": world,
                "config": result.config,
                "output": str(video_path),
                "timings": {
                    "load_s": load_s,
                    "generate_s": result.seconds,
                    "write_s": write_s,
                    "step_s": result.step_seconds,
                },
                "measured_speedup_vs_dense": measured_speedup(args.preset),
                "stats": result.stats,
                "versions": versions(),
            }))
        outputs.commit()

    print(summary_line(result, video_path, settings.steps) + (f" ({world} GPUs)" if world > 1 else ""))
    return 0


def _enable_parallel(pipe, world: int) -> None:
    from dit_sparse import parallel

    try:
        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                parallel.enable_ulysses(getattr(pipe, name), world)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"cannot spread this model over {world} GPUs: {' '.join(str(e).split())}") from e


def summary_line(result, video_path, steps: int) -> str:
    """One line: time, the preset's measured speedup (when the preset table has one), density, cache hits."""
    parts = [f"{result.preset}: {result.seconds:.1f} s for {steps} steps"]
    speed = measured_speedup(result.preset)
    parts.append(f"speedup vs dense {speed['text']}" if speed else "speedup vs dense not measured")
    stats = result.stats
    density, effective = _number(stats.get("density")), _number(stats.get("effective_density"))
    if density is not None:
        parts.append(f"density {density:.2f}" + (f" ({effective:.2f} over all steps)" if effective is not None else ""))
    elif effective is not None:
        parts.append(f"density {effective:.2f} (no sparse steps)")
    cache = stats.get("cache") or {}
    if isinstance(cache.get("lookups"), int) and cache["lookups"]:
        parts.append(f"cache hits {cache.get('hits', 0)}/{cache['lookups']}")
    return " | ".join(parts) + f" -> {video_path}"


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
