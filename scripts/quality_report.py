"""Quality report of the speed presets: speed-up vs dense on this machine, PSNR/SSIM vs the dense video.

For one model (the embedded default, or a local diffusers folder via ``--model``), every preset
generates the same prompts and seeds as dense; per preset the report gives the end-to-end time and
speed-up over dense (this machine), PSNR and SSIM against the dense video of the same prompt and seed
(averaged), and the mean attention density and recall when the sparse-attention stats provide them.
It writes ``quality.md``, ``quality.json`` and ``quality.png`` (speed vs quality) into ``--out-dir``
(default ``benchmarks/``). When ``benchmarks/e2e.json`` exists, the Wan-480p GPU speed-ups it holds
are shown beside this machine's.

Targets on the default model: ``quality`` >= 30 dB PSNR vs dense, ``fast`` >= 25 dB.

Usage::

    python scripts/quality_report.py                       # default model, CPU-sized settings
    python scripts/quality_report.py --model /models/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --frames 81 --height 480 --width 832 --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys

from dit_sparse.cli.compare import REFERENCE
from dit_sparse.cli.errors import CLIError
from dit_sparse.cli.options import add_generation_options, settings_from_args
from dit_sparse.cli.outputs import OutputSet, write_json
from dit_sparse.cli.report import clean_for_json
from dit_sparse.cli.run import check_video_size, generate, load, preset_names, resolve_preset, versions
from dit_sparse.metrics_video import psnr, ssim

TARGETS_DB = {"quality": 30.0, "fast": 25.0}  # PSNR vs dense on the default model
# Prompts in the default model's vocabulary (dit_sparse.data.vocabulary): motion, texture and colour vary.
DEFAULT_PROMPTS = (
    "a red circle moving left on a blue background",
    "a yellow square bouncing on a striped purple background",
    "a white ring turning green on a checkered gray background",
)
# Keys of transformer.sparse_attention_stats() read here: density of the sparse layouts served,
# density over all self-attention calls (dense steps count 1), and recall when the stats carry it.
STAT_KEYS = {"density": "density", "effective_density": "effective_density", "recall": "recall"}


# ---------------------------------------------------------------------------------------------- measuring
def measure(pipe, settings, presets: list[str], prompts: list[str], seeds: list[int], warmup: bool, progress: bool):
    """Run every (prompt, seed) with dense and each preset; returns one record per generation."""
    import dataclasses

    if warmup:  # one short run per preset first, so one-time costs (kernel builds) stay out of the timings
        short = dataclasses.replace(settings, prompt=prompts[0], steps=min(2, settings.steps))
        for name in [REFERENCE, *presets]:
            generate(pipe, short, name, progress=False)
    records = []
    for prompt in prompts:
        for seed in seeds:
            s = dataclasses.replace(settings, prompt=prompt, seed=seed)
            dense = generate(pipe, s, REFERENCE, progress=progress)
            records.append(_record(REFERENCE, prompt, seed, dense, dense))
            for name in presets:
                records.append(_record(name, prompt, seed, generate(pipe, s, name, progress=progress), dense))
    return records


def _record(name, prompt, seed, result, dense) -> dict:
    return {
        "preset": name,
        "prompt": prompt,
        "seed": seed,
        "seconds": result.seconds,
        "psnr_db": psnr(result.frames, dense.frames),
        "ssim": ssim(result.frames, dense.frames),
        **{name: _number(result.stats.get(key)) for name, key in STAT_KEYS.items()},
        "stats": result.stats,
    }


def _number(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_psnr(values) -> float:
    # Identical videos give inf; average the finite ones and report inf only when all are identical.
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def summarize(records: list[dict], presets: list[str], targets: dict[str, float] = TARGETS_DB) -> list[dict]:
    """One row per preset (dense first): mean time, speed-up vs dense, mean PSNR/SSIM, density, recall,
    and whether the preset's PSNR target (``targets``, dB) is met."""
    dense_time = _mean(r["seconds"] for r in records if r["preset"] == REFERENCE)
    rows = []
    for name in [REFERENCE, *presets]:
        rs = [r for r in records if r["preset"] == name]
        seconds = _mean(r["seconds"] for r in rs)
        psnr_db = _mean_psnr([r["psnr_db"] for r in rs])
        target = targets.get(name)
        rows.append({
            "preset": name,
            "runs": len(rs),
            "seconds": seconds,
            "speedup": dense_time / seconds if dense_time and seconds else None,
            "psnr_db": psnr_db,
            "psnr_db_min": min((r["psnr_db"] for r in rs), default=None),
            "ssim": _mean(r["ssim"] for r in rs),
            "density": _mean(r["density"] for r in rs),
            "effective_density": _mean(r["effective_density"] for r in rs),
            "recall": _mean(r["recall"] for r in rs),
            "target_psnr_db": target,
            "meets_target": None if target is None else bool(psnr_db >= target),
        })
    return rows


# ---------------------------------------------------------------------------------------------- e2e.json
def read_e2e_speedups(path: pathlib.Path) -> tuple[dict[str, float], str | None]:
    """Wan-480p speed-ups per preset from ``scripts/bench_e2e.py``'s ``benchmarks/e2e.json``, and where
    they were measured (GPU, model). Reads ``data["wan"]["presets"][name]["speedup"]``; a missing file
    or a file without a Wan section gives ``({}, None)``.
    """
    if not path.is_file():
        return {}, None
    data = json.loads(path.read_text())
    wan = data.get("wan") if isinstance(data, dict) else None
    presets = wan.get("presets") if isinstance(wan, dict) else None
    if not isinstance(presets, dict):
        return {}, None
    found = {
        name: float(r["speedup"]) for name, r in presets.items()
        if isinstance(r, dict) and isinstance(r.get("speedup"), (int, float)) and not isinstance(r["speedup"], bool)
    }
    where = ", ".join(str(v) for v in (data.get("gpu"), wan.get("model"), "480p") if v)
    return found, where


# ---------------------------------------------------------------------------------------------- writing
def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None:
        return missing
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def render_markdown(rows: list[dict], meta: dict, e2e: dict[str, float], e2e_where: str | None) -> str:
    """The report as markdown: settings, the per-preset table, targets, and the plot."""
    s = meta["settings"]
    lines = [
        "# Preset quality report",
        "",
        f"Model `{s['model']}`, {s['frames']} frames at {s['height']}x{s['width']}, {s['steps']} steps, "
        f"guidance {s['guidance']}, {s['device']} / {s['dtype']}; {len(meta['prompts'])} prompts x "
        f"{len(meta['seeds'])} seeds per preset. Generated {meta['date']} by `scripts/quality_report.py` "
        f"on {meta['machine']}.",
        "",
        "PSNR and SSIM compare each video with the dense video of the same prompt and seed (mean over runs; "
        "PSNR min is the worst run). Speed-up is end-to-end generation time vs dense on this machine.",
        "",
    ]
    header = ("| preset | time (s) | speed-up here | PSNR (dB) | PSNR min | SSIM | density (sparse steps) "
              "| density (all steps) | recall | target |")
    align = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    if e2e:
        header = header[:-1] + " GPU speed-up |"
        align += "---:|"
    lines += [header, align]
    for r in rows:
        target = "-" if r["target_psnr_db"] is None else (
            f"{'met' if r['meets_target'] else 'MISSED'} (>= {r['target_psnr_db']:.0f} dB)"
        )
        cells = [
            r["preset"], _fmt(r["seconds"], ".2f"), _fmt(r["speedup"], ".2f", "-") + ("x" if r["speedup"] else ""),
            _fmt(r["psnr_db"], ".2f"), _fmt(r["psnr_db_min"], ".2f"), _fmt(r["ssim"], ".4f"),
            _fmt(r["density"], ".3f", "n/a"), _fmt(r["effective_density"], ".3f", "n/a"),
            _fmt(r["recall"], ".3f", "n/a"), target,
        ]
        if e2e:
            cells.append(f"{e2e[r['preset']]:.2f}x" if r["preset"] in e2e else "not measured")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if e2e:
        lines.append("GPU speed-up: from `benchmarks/e2e.json`" + (f" ({e2e_where})." if e2e_where else "."))
    else:
        lines.append("GPU speed-up: `benchmarks/e2e.json` not found; run `scripts/bench_e2e.py` on a GPU.")
    lines += ["", "![speed vs quality](quality.png)", ""]
    return "\n".join(lines)


def plot(
    rows: list[dict], path: pathlib.Path, e2e: dict[str, float], targets: dict[str, float] = TARGETS_DB
) -> None:
    """Speed-up (x) vs PSNR (y) per preset, saved as PNG at ``path`` (dense, whose PSNR is inf, left out);
    GPU speed-ups from ``e2e`` as a second series, PSNR ``targets`` as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = [r for r in rows if r["speedup"] and math.isfinite(r["psnr_db"])]
    ax.scatter([r["speedup"] for r in pts], [r["psnr_db"] for r in pts], label="this machine", color="tab:blue")
    for r in pts:
        ax.annotate(r["preset"], (r["speedup"], r["psnr_db"]), textcoords="offset points", xytext=(4, 4))
    gpu = [r for r in pts if r["preset"] in e2e]
    if gpu:
        ax.scatter([e2e[r["preset"]] for r in gpu], [r["psnr_db"] for r in gpu], marker="x", color="tab:red",
                   label="GPU speed-up (e2e.json), same PSNR")
    for name, target in targets.items():
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(f"{name} target", (0, target), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("speed-up vs dense (end to end)")
    ax.set_ylabel("PSNR vs dense video (dB)")
    ax.set_title("dit-sparse presets: speed vs quality")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _write_text(path: pathlib.Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_options(p, prompt_required=False)
    p.add_argument("--presets", default=None, help="comma-separated presets (default: all but dense)")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="prompts to average over")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds to average over (default 0 1)")
    p.add_argument("--out-dir", default="benchmarks", help="where quality.md/.json/.png go (default benchmarks)")
    p.add_argument("--e2e", default="benchmarks/e2e.json", help="GPU end-to-end benchmark to show beside")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up run of each preset")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CLIError as e:
        print(f"quality_report: error: {e.message}", file=sys.stderr)
        return e.code


def _run(args) -> int:
    settings = settings_from_args(args)
    names = [n.strip() for n in args.presets.split(",")] if args.presets else preset_names()
    presets = [n for n in dict.fromkeys(names) if n and n != REFERENCE]
    for n in presets:
        resolve_preset(n)
    outputs = OutputSet(args.out_dir)
    md_path, json_path, png_path = outputs.add("quality.md"), outputs.add("quality.json"), outputs.add("quality.png")
    outputs.check()

    with outputs:
        pipe = load(settings)
        check_video_size(pipe, settings)
        records = measure(pipe, settings, presets, args.prompts, args.seeds, not args.no_warmup, not args.no_progress)
        targets = TARGETS_DB if settings.model == "default" else {}  # the targets are for the default model
        rows = summarize(records, presets, targets)
        e2e, e2e_where = read_e2e_speedups(pathlib.Path(args.e2e))
        info = versions()
        meta = {
            "settings": settings.to_dict(),
            "prompts": list(args.prompts),
            "seeds": list(args.seeds),
            "date": datetime.date.today().isoformat(),
            "machine": info["cuda_device"] or f"CPU ({os.cpu_count()} cores)",
        }
        _write_text(outputs.temp(md_path), render_markdown(rows, meta, e2e, e2e_where))
        write_json(outputs.temp(json_path), clean_for_json({
            **meta, "targets_psnr_db": targets, "presets": rows, "runs": records,
            "e2e_speedups": e2e, "e2e_setting": e2e_where, "versions": info,
        }))
        plot(rows, outputs.temp(png_path), e2e, targets)
        outputs.commit()

    for r in rows:
        print(f"{r['preset']:<10} {_fmt(r['speedup'], '.2f')}x  {_fmt(r['psnr_db'], '.2f')} dB  "
              f"SSIM {_fmt(r['ssim'], '.4f')}" + ("" if r["meets_target"] is None else
                                                  f"  target {'met' if r['meets_target'] else 'MISSED'}"))
    print(f"wrote {md_path}, {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
