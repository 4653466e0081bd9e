"""``dit-sparse compare``: the same prompt and seed with several presets, side by side, scored against dense.

Writes into ``--out-dir``: ``<preset>.mp4`` per preset, ``side_by_side.mp4`` and ``side_by_side.gif``,
and ``compare.json`` with per-preset time, PSNR and SSIM against the dense video, and stats.
The dense preset is always generated (first) because it is the reference.

A close PSNR does not mean the same content (on the default model at 12 steps, ``fast`` keeps 31.7 dB
against dense yet draws the asked shape less often: ``benchmarks/prompt_following.md``). So for a prompt of
the procedural grammar (the default model's: ``a red circle moving left on a blue background``) each video
is also judged from its pixels (:func:`dit_sparse.data.judge.judge_video`): how many of shape colour,
background, motion and shape match the prompt, and what the judge saw.
"""

from __future__ import annotations

import argparse

from .errors import CLIError
from .options import add_generation_options, settings_from_args
from .outputs import OutputSet, write_json
from .report import clean_for_json
from .run import check_video_size, generate, load, note_prompt, resolve_preset, versions

__all__ = ["add_parser", "run", "parse_preset_list", "judge_prompt", "REFERENCE"]

REFERENCE = "dense"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="generate with several presets from one seed; side-by-side video and PSNR/SSIM vs dense",
        description="Generate the same prompt and seed with each preset and compare every video with dense.",
    )
    add_generation_options(p)
    p.add_argument("--presets", default="dense,fast", help="comma-separated presets (default dense,fast)")
    p.add_argument("--out-dir", required=True, help="folder for the videos and compare.json (created if missing)")
    p.set_defaults(func=run)


def parse_preset_list(text: str) -> list[str]:
    """``"fast, dense,fast"`` -> ``["dense", "fast"]``: validated, deduplicated, dense first."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError("--presets is empty; give a comma-separated list such as dense,fast")
    for n in names:
        resolve_preset(n)
    ordered = [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]
    return ordered


def run(args: argparse.Namespace) -> int:
    from dit_sparse.metrics_video import psnr, ssim

    settings = settings_from_args(args)
    presets = parse_preset_list(args.presets)
    if REFERENCE not in [n.strip() for n in args.presets.split(",")]:
        print(f"note: adding preset '{REFERENCE}' as the reference video")
    outputs = OutputSet(args.out_dir)
    videos = {name: outputs.add(f"{name}.mp4") for name in presets}
    sbs_mp4, sbs_gif = outputs.add("side_by_side.mp4"), outputs.add("side_by_side.gif")
    json_path = outputs.add("compare.json")
    outputs.check()
    note_prompt(settings)

    with outputs:
        pipe = load(settings)
        check_video_size(pipe, settings)
        results = {name: generate(pipe, settings, name, progress=not args.no_progress) for name in presets}
        dense = results[REFERENCE]
        rows = []
        for name, r in results.items():
            rows.append({
                "preset": name,
                "video": str(videos[name]),
                "seconds": r.seconds,
                "speedup_vs_dense": dense.seconds / r.seconds if r.seconds > 0 else None,
                "psnr_db": psnr(r.frames, dense.frames),
                "ssim": ssim(r.frames, dense.frames),
                "judge": judge_prompt(r.frames, settings.prompt),
                "stats": r.stats,
                "config": r.config,
            })

        from dit_sparse.pipelines.video import write_video

        from .side_by_side import side_by_side

        for name, r in results.items():
            write_video(r.frames, outputs.temp(videos[name]), fps=settings.fps)
        captions = [_caption(row) for row in rows]
        combined = side_by_side([r.frames for r in results.values()], captions)
        write_video(combined, outputs.temp(sbs_mp4), fps=settings.fps)
        _write_gif(combined, outputs.temp(sbs_gif), settings.fps)
        write_json(outputs.temp(json_path), clean_for_json({
            "command": "compare",
            "reference": REFERENCE,
            "settings": settings.to_dict(),
            "presets": rows,
            "side_by_side": {"mp4": str(sbs_mp4), "gif": str(sbs_gif)},
            "versions": versions(),
        }))
        written = outputs.commit()

    print(format_table(rows))
    print(f"wrote {len(written)} files to {args.out_dir}")
    return 0


def judge_prompt(frames, prompt: str) -> dict | None:
    """What the pixel judge sees in ``frames`` ([F, H, W, 3] uint8) for a prompt of the procedural grammar:
    ``{"matches": n, "of": 4, "all_correct", "seen": {attr: predicted}}``; None for any other prompt, or for
    a video too small to judge (fewer than 2 frames or 16x16 pixels)."""
    from dit_sparse.data.judge import ATTRIBUTES, judge_video
    from dit_sparse.data.vocabulary import parse_prompt

    try:
        attrs = parse_prompt(prompt)
    except ValueError:
        return None
    if frames.shape[0] < 2 or min(frames.shape[1:3]) < 16:
        return None
    verdict = judge_video(frames, attrs)
    return {
        "matches": sum(bool(verdict[a]["correct"]) for a in ATTRIBUTES),
        "of": len(ATTRIBUTES),
        "all_correct": bool(verdict["all_correct"]),
        "seen": {a: verdict[a]["predicted"] for a in ATTRIBUTES},
    }


def _caption(row: dict) -> str:
    if row["preset"] == REFERENCE:
        return f"{REFERENCE} (reference)"
    p = row["psnr_db"]
    return f"{row['preset']} {p:.1f} dB" if p != float("inf") else f"{row['preset']} identical"


def _write_gif(frames, path, fps: int) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)


def format_table(rows: list[dict]) -> str:
    """Plain-text table: preset, seconds, speedup vs dense on this machine, PSNR, SSIM, and - for a prompt
    of the procedural grammar - how many of its four attributes the judge sees."""
    judged = any(r.get("judge") for r in rows)
    lines = [f"{'preset':<10} {'time_s':>8} {'speedup':>8} {'psnr_db':>8} {'ssim':>7}"
             + (f" {'prompt':>6}" if judged else "")]
    for r in rows:
        speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
        p = "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.2f}"
        line = f"{r['preset']:<10} {r['seconds']:>8.2f} {speed:>8} {p:>8} {r['ssim']:>7.4f}"
        if judged:
            j = r.get("judge")
            seen = f"{j['matches']}/{j['of']}" if j else "-"
            line += f" {seen:>6}"
        lines.append(line)
    if judged:
        lines.append("prompt: attributes of the prompt (shape colour, background, motion, shape) that the pixel "
                     "judge sees in the video (dit_sparse.data.judge)")
    return "\n".join(lines)
