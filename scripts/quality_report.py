"""Quality report of the speed presets: speed-up vs dense on this machine, PSNR/SSIM vs the dense video.

For one model (the embedded default, or a local diffusers folder via ``--model``), every preset
generates the same prompts and seeds as dense; per preset the report gives the end-to-end time and
speed-up over dense (this machine), PSNR and SSIM against the dense video of the same prompt and seed
(averaged), the mean attention density (from the sparse-attention stats) and the mean attention recall:
for every sparse attention call, the share of the dense softmax mass inside the kept blocks
(:func:`dit_sparse.patterns.attention_recall` on that call's q, k and layout; its time is taken out of the
timings; ``--no-recall`` skips it). It writes ``quality.md``, ``quality.json`` and ``quality.png`` (speed
vs quality) into ``--out-dir`` (default ``benchmarks/``). When ``benchmarks/e2e.json`` exists, the
Wan-480p GPU speed-ups it holds are shown beside this machine's.

Targets on the default model: ``quality`` >= 30 dB PSNR vs dense, ``fast`` >= 25 dB.

CPU defaults (default model, no ``--device cuda``): 17 frames of 256x256 (latent 5x32x32, 1280 tokens:
the default size's 16x16 token plane with 5 instead of 9 latent frames; the presets' block densities there
are within 0.03 of the default size's - quality 1.00 at both, fast 0.80 vs 0.78), 12 steps, guidance 4,
the three prompts with seed 0, no warm-up runs: about 5 minutes per prompt on 2 CPU cores (most of it
``balanced``, whose top-k path is slow on CPU), 2-3 times that at the default size. PSNR differs by several
dB between prompts, so one prompt (``--prompts "..."``, a quicker check) is a rough number. On CUDA the
defaults are the default size (33 frames), the three prompts and seeds 0 1, with warm-up runs. Any of
``--frames``, ``--prompts``, ``--seeds``, ``--warmup`` / ``--no-warmup`` overrides them.

``--variant PRESET:FIELD=VALUE[:FIELD=VALUE...]`` adds rows for a preset with changed config fields
(values in JSON, e.g. ``--variant fast:dense_steps=0.3 --variant "fast:window=[5,5,5]"``): a way to find the
setting that would meet a target. Variants are reported apart from the presets (``variants`` in the JSON).

Usage::

    python scripts/quality_report.py                       # default model, CPU-sized settings
    python scripts/quality_report.py --e2e /path/to/e2e.json --variant fast:dense_steps=0.2
    python scripts/quality_report.py --render-from benchmarks/quality.json   # new e2e.json, same runs
    python scripts/quality_report.py --model /models/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --frames 81 --height 480 --width 832 --steps 50 --no-recall
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time

import torch

import dit_sparse.cli.run as cli_run
from dit_sparse.cli.compare import REFERENCE, judge_prompt
from dit_sparse.cli.errors import CLIError, exit_code
from dit_sparse.cli.options import add_generation_options, settings_from_args
from dit_sparse.cli.outputs import OutputSet, write_json
from dit_sparse.cli.report import clean_for_json
from dit_sparse.cli.run import check_video_size, generate, load, parse_variant, preset_names, resolve_preset, versions
from dit_sparse.metrics_video import psnr, ssim

TARGETS_DB = {"quality": 30.0, "fast": 25.0}  # PSNR vs dense on the default model
# Prompts in the default model's vocabulary (dit_sparse.data.vocabulary): motion, texture and colour vary.
DEFAULT_PROMPTS = (
    "a red circle moving left on a blue background",
    "a yellow square bouncing on a striped purple background",
    "a white ring turning green on a checkered gray background",
)
# Keys of transformer.sparse_attention_stats() read here: density of the sparse layouts served and
# density over all self-attention calls (dense steps count 1). Recall is measured here (RecallMeter).
STAT_KEYS = {"density": "density", "effective_density": "effective_density"}
# CPU defaults for the default model (see the module docstring): about 5 minutes per prompt on 2 cores.
CPU_FRAMES, CPU_SEEDS = 17, (0,)
GPU_SEEDS = (0, 1)
PLOT_PSNR_CAP = 60.0  # dB; above it a video equals dense up to float noise


# ---------------------------------------------------------------------------------------------- measuring
def measure(pipe, settings, presets: list[str], prompts: list[str], seeds: list[int], warmup: bool, progress: bool,
            recall: bool = True, variants: dict | None = None):
    """Run every (prompt, seed) with dense and each preset (then each of ``variants``: name -> config);
    returns one record per generation."""
    variants = variants or {}
    names = [*presets, *variants]
    with _variant_configs(variants):
        if warmup:  # one short run per preset first, so one-time costs (kernel builds) stay out of the timings
            short = dataclasses.replace(settings, prompt=prompts[0], steps=min(2, settings.steps))
            for name in [REFERENCE, *names]:
                generate(pipe, short, name, progress=False)
        records = []
        for prompt in prompts:
            for seed in seeds:
                s = dataclasses.replace(settings, prompt=prompt, seed=seed)
                dense = generate(pipe, s, REFERENCE, progress=progress)
                records.append(_record(REFERENCE, prompt, seed, dense, dense))
                for name in names:
                    with RecallMeter(enabled=recall, sync=s.resolved_device().startswith("cuda")) as meter:
                        result = generate(pipe, s, name, progress=progress)
                    records.append(_record(name, prompt, seed, result, dense, meter))
    return records


@contextlib.contextmanager
def _variant_configs(variants: dict):
    """While active, the CLI's preset lookup also knows the variant names (generate() resolves by name)."""
    if not variants:
        yield
        return
    real = cli_run.resolve_preset
    cli_run.resolve_preset = lambda name: variants[name] if name in variants else real(name)
    try:
        yield
    finally:
        cli_run.resolve_preset = real


class RecallMeter:
    """Attention recall of every sparse attention call while active: wraps the block-sparse kernel entry
    (``dit_sparse.kernels.block_sparse_attention``, which the engine looks up per call) and, before each
    call, computes :func:`~dit_sparse.patterns.attention_recall` of its layout on its q, k (tile order, as
    the kernel gets them). ``seconds`` is the time spent on that, taken out of the generation's time."""

    def __init__(self, enabled: bool = True, sync: bool = False):
        self.enabled, self.sync = enabled, sync
        self.values: list = []
        self.seconds = 0.0
        self._saved = None

    def __enter__(self):
        if not self.enabled:
            return self
        import dit_sparse.kernels as kernels
        from dit_sparse.patterns import attention_recall

        self._saved = kernels.__dict__.get("block_sparse_attention")
        real = kernels.block_sparse_attention

        def measured(q, k, v, layout, *args, **kwargs):
            start = self._clock()
            with torch.no_grad():
                self.values.append(attention_recall(layout, q, k, scale=kwargs.get("scale")).mean().float())
            self.seconds += self._clock() - start
            return real(q, k, v, layout, *args, **kwargs)

        kernels.block_sparse_attention = measured
        return self

    def _clock(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        import dit_sparse.kernels as kernels

        if self._saved is None:
            kernels.__dict__.pop("block_sparse_attention", None)  # back to the package's lazy lookup
        else:
            kernels.block_sparse_attention = self._saved
        return False

    @property
    def recall(self) -> float | None:
        """Mean recall over the measured calls (None when there were none)."""
        if not self.values:
            return None
        return float(torch.stack(self.values).mean())


def _record(name, prompt, seed, result, dense, meter: RecallMeter | None = None) -> dict:
    overhead = meter.seconds if meter is not None else 0.0
    return {
        "preset": name,
        "prompt": prompt,
        "seed": seed,
        "seconds": result.seconds - overhead,
        "recall_seconds": overhead,
        "psnr_db": psnr(result.frames, dense.frames),
        "ssim": ssim(result.frames, dense.frames),
        "judge": judge_prompt(result.frames, prompt),
        **{name: _number(result.stats.get(key)) for name, key in STAT_KEYS.items()},
        "recall": meter.recall if meter is not None else None,
        "recall_calls": len(meter.values) if meter is not None else 0,
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
            # attributes of the prompt the pixel judge sees (of 4), mean over the runs it could judge
            "prompt_matches": _mean((r.get("judge") or {}).get("matches") for r in rs),
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
    date = str(data.get("date") or "")[:10]
    where = ", ".join(str(v) for v in (data.get("gpu"), wan.get("model"), "480p", date) if v)
    return found, where


# ---------------------------------------------------------------------------------------------- writing
def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None:
        return missing
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def render_markdown(rows: list[dict], meta: dict, e2e: dict[str, float], e2e_where: str | None,
                    variants: list[dict] | None = None) -> str:
    """The report as markdown: settings, the per-preset table (then the variants'), targets, and the plot."""
    s = meta["settings"]
    lines = [
        "# Preset quality report",
        "",
        f"Model `{s['model']}`, {s['frames']} frames at {s['height']}x{s['width']}, {s['steps']} steps, "
        f"guidance {s['guidance']}, {s['device']} / {s['dtype']}; {len(meta['prompts'])} prompts x "
        f"{len(meta['seeds'])} seeds per preset. Generated {meta['date']} by `scripts/quality_report.py` "
        f"on {meta['machine']}.",
        "",
        "Prompts: " + "; ".join(f"`{p}`" for p in meta["prompts"]) + ". Seeds: "
        + ", ".join(str(v) for v in meta["seeds"]) + ".",
        "",
        "PSNR and SSIM compare each video with the dense video of the same prompt and seed (mean over runs; "
        "PSNR min is the worst run). Speed-up is end-to-end generation time vs dense on this machine. "
        "Density: share of the attention blocks computed on sparse steps, and over all steps (dense steps "
        "count 1). Recall: share of the dense attention's softmax mass inside the kept blocks, mean over the "
        "sparse attention calls. Prompt: how many of the prompt's shape colour, background, motion and shape "
        "the pixel judge (`dit_sparse.data.judge`) sees in the video, mean over runs (`-`: a prompt outside the "
        "procedural grammar) - a PSNR close to dense does not guarantee the same content.",
        "",
    ]
    header = ("| preset | time (s) | speed-up here | PSNR (dB) | PSNR min | SSIM | prompt (of 4) "
              "| density (sparse steps) | density (all steps) | recall | target |")
    align = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    plain_header, plain_align = header, align
    if e2e:
        header += " GPU speed-up |"
        align += "---:|"
    lines += [header, align]
    lines += [_table_row(r, e2e) for r in rows]
    lines.append("")
    if e2e:
        lines.append("GPU speed-up: from `benchmarks/e2e.json`" + (f" ({e2e_where})." if e2e_where else "."))
    else:
        lines.append("GPU speed-up: `benchmarks/e2e.json` not found; run `scripts/bench_e2e.py` on a GPU.")
    notes = []
    for r in rows:
        if r["preset"] != REFERENCE and r["density"] is not None and r["density"] >= 0.999:
            notes.append(f"`{r['preset']}` keeps every attention block at this size (density {r['density']:.3f}): "
                         "its PSNR only shows that its path matches dense, not what its pattern costs at a size "
                         "where it is sparse.")
    if meta["settings"].get("device") == "cpu" or str(meta.get("machine", "")).startswith("CPU"):
        notes.append("Times here are CPU times (dit-sparse's PyTorch fallback, not the GPU kernels) on a machine "
                     "that may be shared: they vary from run to run; the GPU column is the speed that matters.")
    for n in notes:
        lines += ["", f"Note: {n}"]
    if variants:
        lines += ["", "Variants (a preset with changed config fields; not presets, no targets):", "",
                  plain_header, plain_align]
        lines += [_table_row(r, {}) for r in variants]
    lines += ["", "![speed vs quality](quality.png)", ""]
    return "\n".join(lines)


def _table_row(r: dict, e2e: dict[str, float]) -> str:
    target = "-" if r["target_psnr_db"] is None else (
        f"{'met' if r['meets_target'] else 'MISSED'} (>= {r['target_psnr_db']:.0f} dB)"
    )
    cells = [
        r["preset"], _fmt(r["seconds"], ".2f"), _fmt(r["speedup"], ".2f", "-") + ("x" if r["speedup"] else ""),
        _fmt(r["psnr_db"], ".2f"), _fmt(r["psnr_db_min"], ".2f"), _fmt(r["ssim"], ".4f"),
        _fmt(r.get("prompt_matches"), ".2f"),
        _fmt(r["density"], ".3f", "n/a"), _fmt(r["effective_density"], ".3f", "n/a"),
        _fmt(r["recall"], ".3f", "n/a"), target,
    ]
    if e2e:
        cells.append(f"{e2e[r['preset']]:.2f}x" if r["preset"] in e2e else "not measured")
    return "| " + " | ".join(cells) + " |"


def plot(
    rows: list[dict], path: pathlib.Path, e2e: dict[str, float], targets: dict[str, float] = TARGETS_DB
) -> None:
    """Speed-up (x) vs PSNR (y) per preset, saved as PNG at ``path`` (dense, whose PSNR is inf, left out);
    GPU speed-ups from ``e2e`` as a second series, PSNR ``targets`` as dotted lines. PSNRs above
    ``PLOT_PSNR_CAP`` (videos equal to dense up to float noise) are drawn at the cap, marked ">=" ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = [r for r in rows if r["speedup"] and math.isfinite(r["psnr_db"])]
    y = {r["preset"]: min(r["psnr_db"], PLOT_PSNR_CAP) for r in pts}
    ax.scatter([r["speedup"] for r in pts], [y[r["preset"]] for r in pts], label="this machine", color="tab:blue")
    for r in pts:
        label = r["preset"] + (f" (>= {PLOT_PSNR_CAP:.0f} dB)" if r["psnr_db"] > PLOT_PSNR_CAP else "")
        ax.annotate(label, (r["speedup"], y[r["preset"]]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    gpu = [r for r in pts if r["preset"] in e2e]
    if gpu:
        ax.scatter([e2e[r["preset"]] for r in gpu], [y[r["preset"]] for r in gpu], marker="x", color="tab:red",
                   label="GPU speed-up (e2e.json), same PSNR")
        for r in gpu:
            ax.annotate(r["preset"], (e2e[r["preset"]], y[r["preset"]]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="tab:red")
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
    # None: the device-dependent defaults of the module docstring (CPU: 17 frames, seed 0, no warm-up).
    p.set_defaults(frames=None)
    for action in p._actions:
        if action.dest == "frames":
            action.help = f"number of frames (default: {CPU_FRAMES} for the default model on CPU, else 33)"
    p.add_argument("--presets", default=None, help="comma-separated presets (default: all but dense)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help=f"prompts to average over (default: the {len(DEFAULT_PROMPTS)} built-in ones)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to average over (default: 0 on CPU, 0 1 on CUDA)")
    p.add_argument("--out-dir", default="benchmarks", help="where quality.md/.json/.png go (default benchmarks)")
    p.add_argument("--e2e", default="benchmarks/e2e.json", help="GPU end-to-end benchmark to show beside")
    warm = p.add_mutually_exclusive_group()
    warm.add_argument("--warmup", dest="warmup", action="store_true", default=None,
                      help="a short warm-up run of each preset first (default on CUDA)")
    warm.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up runs (default on CPU)")
    p.add_argument("--no-recall", action="store_true", help="skip the attention recall measurement")
    p.add_argument("--variant", action="append", default=[], metavar="PRESET:FIELD=VALUE[:FIELD=VALUE...]",
                   help="also measure a preset with changed config fields (repeatable)")
    p.add_argument("--render-from", default=None, metavar="QUALITY_JSON",
                   help="generate nothing: write the report again from the runs in this quality.json (with the "
                        "current --e2e file)")
    return p


def resolve_defaults(args) -> None:
    """Fill the device-dependent defaults (module docstring) into ``args`` in place."""
    on_cpu = cli_run.GenerationSettings(device=args.device).resolved_device() == "cpu"
    if args.frames is None:
        args.frames = CPU_FRAMES if on_cpu and args.model == "default" else cli_run.GenerationSettings.frames
    if args.prompts is None:
        args.prompts = list(DEFAULT_PROMPTS)
    if args.seeds is None:
        args.seeds = list(CPU_SEEDS if on_cpu else GPU_SEEDS)
    if args.warmup is None:
        args.warmup = not on_cpu


def main(argv: list[str] | None = None) -> int:
    return exit_code("quality_report", _run, build_parser().parse_args(argv))


def _run(args) -> int:
    if args.render_from:
        return _render_only(args)
    resolve_defaults(args)
    settings = settings_from_args(args)
    names = [n.strip() for n in args.presets.split(",")] if args.presets else preset_names()
    presets = [n for n in dict.fromkeys(names) if n and n != REFERENCE]
    for n in presets:
        resolve_preset(n)
    variants = {spec: parse_variant(spec) for spec in dict.fromkeys(args.variant)}
    outputs = OutputSet(args.out_dir)
    paths = outputs.add("quality.md"), outputs.add("quality.json"), outputs.add("quality.png")
    outputs.check()

    with outputs:
        pipe = load(settings)
        check_video_size(pipe, settings)
        records = measure(pipe, settings, presets, args.prompts, args.seeds, args.warmup, not args.no_progress,
                          recall=not args.no_recall, variants=variants)
        targets = TARGETS_DB if settings.model == "default" else {}  # the targets are for the default model
        info = versions()
        meta = {
            "settings": settings.to_dict(),
            "prompts": list(args.prompts),
            "seeds": list(args.seeds),
            "date": datetime.date.today().isoformat(),
            "machine": info["cuda_device"] or f"CPU ({os.cpu_count()} cores)",
        }
        # One line on what was measured (scripts/record_preset_measurements.py copies it next to the numbers).
        meta["setting"] = (
            f"{'default model' if settings.model == 'default' else settings.model}, {settings.frames} frames "
            f"{settings.height}x{settings.width}, {settings.steps} steps, {len(args.prompts)} prompt(s) x "
            f"{len(args.seeds)} seed(s), {settings.resolved_device()} {settings.resolved_dtype()}, {meta['date']}"
        )
        rows = _write_outputs(outputs, paths, records, presets, list(variants), targets, meta, info, args.e2e)
    return _print_summary(rows, paths)


def _render_only(args) -> int:
    """``--render-from quality.json``: the report again from its recorded runs, with the current e2e.json
    (e.g. after a new GPU benchmark), without generating anything."""
    try:
        data = json.loads(pathlib.Path(args.render_from).read_text())
        records = data["runs"]
        presets = [r["preset"] for r in data["presets"] if r["preset"] != REFERENCE]
        variants = [r["preset"] for r in data.get("variants", [])]
        meta = {k: data[k] for k in ("settings", "prompts", "seeds", "date", "machine", "setting") if k in data}
        targets, info = data.get("targets_psnr_db", {}), data.get("versions", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--render-from {args.render_from}: not a quality.json of this script ({e})") from e
    for r in records:  # identical videos: PSNR inf, stored as null
        if r.get("psnr_db") is None:
            r["psnr_db"] = math.inf
    outputs = OutputSet(args.out_dir)
    paths = outputs.add("quality.md"), outputs.add("quality.json"), outputs.add("quality.png")
    outputs.check()
    with outputs:
        rows = _write_outputs(outputs, paths, records, presets, variants, targets, meta, info, args.e2e)
    return _print_summary(rows, paths)


def _write_outputs(outputs, paths, records, presets, variants, targets, meta, info, e2e_path) -> list[dict]:
    md_path, json_path, png_path = paths
    rows = summarize(records, presets, targets)
    variant_rows = summarize(records, variants, {})[1:] if variants else []
    e2e, e2e_where = read_e2e_speedups(pathlib.Path(e2e_path))
    _write_text(outputs.temp(md_path), render_markdown(rows, meta, e2e, e2e_where, variant_rows))
    write_json(outputs.temp(json_path), clean_for_json({
        **meta, "targets_psnr_db": targets, "presets": rows, "variants": variant_rows, "runs": records,
        "e2e_speedups": e2e, "e2e_setting": e2e_where, "versions": info,
    }))
    plot(rows, outputs.temp(png_path), e2e, targets)
    outputs.commit()
    return rows + variant_rows


def _print_summary(rows: list[dict], paths) -> int:
    for r in rows:
        print(f"{r['preset']:<10} {_fmt(r['speedup'], '.2f')}x  {_fmt(r['psnr_db'], '.2f')} dB  "
              f"SSIM {_fmt(r['ssim'], '.4f')}  recall {_fmt(r['recall'], '.3f', 'n/a')}"
              + ("" if r["meets_target"] is None else f"  target {'met' if r['meets_target'] else 'MISSED'}"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0

if __name__ == "__main__":
    sys.exit(main())
