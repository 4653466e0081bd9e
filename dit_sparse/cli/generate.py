"""``dit-sparse generate``: one video from a prompt with a speed preset, plus a JSON report."""

from __future__ import annotations

import argparse
import math
import time

from .options import add_generation_options, add_preset_option, settings_from_args
from .outputs import OutputSet, write_json
from .presets_cmd import measured_speedup
from .report import clean_for_json
from .run import check_video_size, generate, load, resolve_preset, versions

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    resolve_preset(args.preset)  # unknown preset: fail before anything loads
    outputs = OutputSet()
    video_path = outputs.add(args.out, (".mp4",), "--out")
    report_path = outputs.add(args.report, (".json",), "--report") if args.report else None
    outputs.check()

    with outputs:
        t0 = time.perf_counter()
        pipe = load(settings)
        load_s = time.perf_counter() - t0
        check_video_size(pipe, settings)
        result = generate(pipe, settings, args.preset, progress=not args.no_progress)

        from dit_sparse.pipelines.video import write_video

        t0 = time.perf_counter()
        write_video(result.frames, outputs.temp(video_path), fps=settings.fps)
        write_s = time.perf_counter() - t0
        if report_path is not None:
            write_json(outputs.temp(report_path), clean_for_json({
                "command": "generate",
                "preset": args.preset,
                "settings": settings.to_dict(),
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

    print(summary_line(result, video_path, settings.steps))
    return 0


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
