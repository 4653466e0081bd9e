"""Prompt following of a text-to-video model on held-out procedural prompts, judged from the pixels.

The model (the embedded default, or a local diffusers folder via ``--model``) generates one video for each
of ``--n`` prompts of the procedural set (:func:`dit_sparse.data.sample_spec` with ``--spec-seed``, 777 by
default: training draws its specs from seeds 0-4, see ``scripts/train_default_model.py``), once per speed
preset of ``--presets`` (applied with :func:`dit_sparse.apply_sparse_attention`). Every video is judged by
:func:`dit_sparse.data.judge.judge_video`: shape colour, background colour, motion, shape, all four.

Two reference rows come with it, for the same prompts at the same size:

* ``renders`` - the ground-truth renders judged as they are: what the judge itself gets right;
* ``renders through VAE`` - the renders encoded and decoded by the model's VAE: the most a generation
  can score when the VAE is the only loss (``--no-vae-ceiling`` skips it; on 2 CPU cores the default
  model's VAE takes about 2.4 s per 9 x 128 x 128 video and 8 s per 17 x 256 x 256 one).

Chance is the accuracy of answering with the attributes of another prompt drawn the same way
(:func:`dit_sparse.data.judge.chance_accuracy`). Writes ``prompt_following.json``, ``.md`` and ``.png`` (a
contact sheet of the first generations with what was asked and what the judge saw) into ``--out-dir``
(default ``benchmarks/``), all together and only when the run completes.

``--judge-only`` generates nothing: it checks the judge on ``--n`` renders as they are and degraded by
:func:`dit_sparse.data.judge.degrade_video` (blur + colour offset + pixel noise), and writes
``judge_check.json`` / ``.md``.

Defaults are the default model's (33 frames of 256x256, 12 steps, guidance 4) and 48 prompts - sized for a
GPU, where videos are generated ``--batch-size`` at a time (default 8 on CUDA, 1 on CPU). On 2 CPU cores
the default model takes 27 s per 17-frame 256x256 video at 8 steps (``--n 6 --frames 17 --steps 8``: under
4 minutes in all); a quick check (about 30 s)::

    python scripts/prompt_following.py --n 4 --frames 9 --height 128 --width 128 --steps 4 --out-dir /tmp/pf

Usage::

    python scripts/prompt_following.py --device cuda                      # default model, dense
    python scripts/prompt_following.py --device cuda --presets dense,quality,fast
    python scripts/prompt_following.py --model /models/my-procedural-wan --device cuda --n 96
    python scripts/prompt_following.py --judge-only --n 300 --frames 17 --height 128 --width 128
    python scripts/prompt_following.py --presets dense --config fast-no-reuse=no_reuse.json

``--config LABEL=FILE.json`` (repeatable) adds a row for a config of your own, after the presets: FILE holds
:class:`~dit_sparse.SparseAttentionConfig` fields (as ``to_dict()`` writes them), optionally with
``"preset": NAME`` as the base the other fields override - e.g. ``{"preset": "fast", "reuse_every": null}``
is ``fast`` without block reuse.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

from dit_sparse.cli.compare import REFERENCE
from dit_sparse.cli.errors import FAILURE, CLIError, exit_code
from dit_sparse.cli.options import positive_int
from dit_sparse.cli.outputs import OutputSet, write_json
from dit_sparse.cli.report import clean_for_json
from dit_sparse.cli.run import (
    DTYPES, GenerationSettings, check_video_size, derive_config, load, resolve_preset, versions,
)
from dit_sparse.config import SparseAttentionConfig
from dit_sparse.data import HELD_OUT_SPEC_SEED, held_out_specs, render_videos, video_to_model_input
from dit_sparse.data.judge import ATTRIBUTES, accuracy, chance_accuracy, degrade_video, judge_video
from dit_sparse.pipelines.default_model import (
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_WIDTH,
)

DEFAULT_N = 48  # prompts; with 8 motions x 9 colours x 5 shapes, about 6 per motion
GPU_BATCH, CPU_BATCH = 8, 1
SHEET_VIDEOS, SHEET_FRAMES = 6, 5  # contact sheet: the first 6 videos of the first preset, 5 frames each
COLUMNS = (*ATTRIBUTES, "all_correct")
DEGRADATION = {"noise_std": 0.05, "color_shift": 0.04}  # --judge-only; plus a blur of 1.5 px per 128 px
RENDERS, VAE_ROUND_TRIP, DEGRADED = "renders", "renders through VAE", "renders, degraded"


# ---------------------------------------------------------------------------------------------- videos
def rendered(specs, settings: GenerationSettings, chunk: int = 8):
    """Ground-truth renders of ``specs`` at the settings' size, float ``[F, H, W, 3]`` on the CPU, one by one."""
    for start in range(0, len(specs), chunk):
        yield from render_videos(specs[start:start + chunk], settings.frames, settings.height, settings.width)


def vae_round_trip(pipe, videos: torch.Tensor) -> torch.Tensor:
    """``videos`` float ``[N, F, H, W, 3]`` in [0, 1] encoded and decoded by ``pipe.vae`` (latent mode), back
    as float ``[N, F, H, W, 3]`` in [0, 1] on the CPU."""
    vae = pipe.vae
    x = video_to_model_input(videos).to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((y.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu()


def generate_batch(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings) -> np.ndarray:
    """One pipeline call for ``prompts`` (seed ``seeds[i]`` for prompt i, so a video does not depend on the
    batch it is in); float ``[N, F, H, W, 3]`` in [0, 1]."""
    out = pipe(prompt=prompts, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
               **settings.pipeline_kwargs())
    return np.asarray(out.frames, dtype=np.float32)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- measuring
def judge_all(source: str, videos, specs, seeds=None, keep: int = 0) -> tuple[dict, list]:
    """Judge ``videos`` (an iterable in the order of ``specs``, consumed one at a time); returns the row of
    ``source`` and one record per video. The first ``keep`` videos are kept (uint8) in their records under
    ``"frames"`` for the contact sheet."""
    records, judge_seconds = [], 0.0
    for i, (video, spec) in enumerate(zip(videos, specs)):
        start = time.perf_counter()
        record = {"source": source, "index": i, "prompt": spec.prompt, "verdict": judge_video(video, spec)}
        judge_seconds += time.perf_counter() - start
        if seeds is not None:
            record["seed"] = seeds[i]
        if i < keep:
            record["frames"] = _uint8(video)
        records.append(record)
    row = {"source": source, "n": len(records), "accuracy": accuracy([r["verdict"] for r in records]),
           "judge_seconds_per_video": judge_seconds / len(records)}
    return row, records


def _uint8(video) -> np.ndarray:
    video = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    return (np.clip(video, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _generated(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings, batch: int, clock: dict,
               bar=None):
    """Yield the videos of ``prompts`` generated ``batch`` at a time, adding the generation seconds to
    ``clock["seconds"]`` and advancing the progress ``bar``."""
    device = settings.resolved_device()
    for ids in _chunks(list(range(len(prompts))), batch):
        _sync(device)
        start = time.perf_counter()
        videos = generate_batch(pipe, [prompts[i] for i in ids], [seeds[i] for i in ids], settings)
        _sync(device)
        clock["seconds"] += time.perf_counter() - start
        if bar is not None:
            bar.update(len(ids))
        yield from videos


def _round_trips(pipe, specs, settings: GenerationSettings, batch: int, clock: dict):
    """Yield the renders of ``specs`` through ``pipe``'s VAE, ``batch`` at a time, adding the VAE seconds to
    ``clock["seconds"]``."""
    device = settings.resolved_device()
    for ids in _chunks(list(range(len(specs))), batch):
        videos = render_videos([specs[i] for i in ids], settings.frames, settings.height, settings.width)
        _sync(device)
        start = time.perf_counter()
        videos = vae_round_trip(pipe, videos)
        _sync(device)
        clock["seconds"] += time.perf_counter() - start
        yield from videos


def measure_renders(specs, settings: GenerationSettings, pipe=None, batch: int = CPU_BATCH):
    """The reference rows: renders as they are, and (with ``pipe``) through its VAE, ``batch`` at a time."""
    row, records = judge_all(RENDERS, rendered(specs, settings), specs)
    rows = [row]
    if pipe is not None:
        clock = {"seconds": 0.0}
        vae_row, vae_records = judge_all(VAE_ROUND_TRIP, _round_trips(pipe, specs, settings, batch, clock), specs)
        vae_row["seconds"] = clock["seconds"]
        rows.append(vae_row)
        records += vae_records
    return rows, records


def measure_presets(pipe, specs, settings: GenerationSettings, presets: list[tuple[str, SparseAttentionConfig]],
                    batch: int, progress: bool, keep: int) -> tuple[list[dict], list[dict]]:
    """Generate every prompt with every ``(label, config)`` of ``presets`` (applied, then removed), ``batch``
    prompts per pipeline call, and judge the videos as they come; the first ``keep`` videos of the first
    config are kept for the sheet."""
    from tqdm.auto import tqdm

    from dit_sparse import apply_sparse_attention, remove_sparse_attention

    prompts = [s.prompt for s in specs]
    seeds = [settings.seed + i for i in range(len(specs))]
    pipe.set_progress_bar_config(disable=True)
    rows, records = [], []
    for name, config in presets:
        try:
            apply_sparse_attention(pipe, config)
        except ValueError as e:
            raise CLIError(f"cannot apply preset '{name}': {' '.join(str(e).split())}") from e
        clock = {"seconds": 0.0}
        bar = tqdm(total=len(specs), desc=name, unit="video", disable=not progress, leave=False)
        try:
            videos = _generated(pipe, prompts, seeds, settings, batch, clock, bar)
            row, preset_records = judge_all(name, videos, specs, seeds, keep=keep if not rows else 0)
        finally:
            bar.close()
            remove_sparse_attention(pipe)
        row.update(preset=name, seconds=clock["seconds"], seconds_per_video=clock["seconds"] / len(specs))
        rows.append(row)
        records += preset_records
    return rows, records


def measure_judge(specs, settings: GenerationSettings) -> tuple[list[dict], list[dict]]:
    """``--judge-only``: the judge on renders as they are and degraded (blur + colour offset + noise); the
    blur is 1.5 pixels per 128 pixels of the shorter side."""
    blur = 1.5 * min(settings.height, settings.width) / 128
    row, records = judge_all(RENDERS, rendered(specs, settings), specs)
    degraded = (degrade_video(v, blur_sigma=blur, seed=i, **DEGRADATION)
                for i, v in enumerate(rendered(specs, settings)))
    degraded_row, degraded_records = judge_all(DEGRADED, degraded, specs)
    degraded_row["degradation"] = {"blur_sigma_px": blur, **DEGRADATION}
    return [row, degraded_row], records + degraded_records


JUDGE_THREADS = 4  # CPU threads when generating on a GPU (the CPU only judges and renders)


def settings_batch(settings: GenerationSettings) -> int:
    return GPU_BATCH if settings.resolved_device().startswith("cuda") else CPU_BATCH


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------------------------------------- writing
def misses(records: list[dict], source: str) -> dict[str, dict[str, int]]:
    """Per attribute, how often each ``asked -> predicted`` mistake happened for ``source``."""
    out: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    for r in records:
        if r["source"] != source:
            continue
        for a in ATTRIBUTES:
            v = r["verdict"][a]
            if not v["correct"]:
                key = f"{v['asked']} -> {v['predicted']}"
                out[a][key] = out[a].get(key, 0) + 1
    return out


def render_markdown(meta: dict, rows: list[dict], chance: dict, records: list[dict], sheet: bool) -> str:
    s = meta["settings"]
    title = "Judge check" if meta["mode"] == "judge-only" else "Prompt following"
    lines = [
        f"# {title}",
        "",
        f"Model `{meta['model']}`, {meta['n']} held-out prompts (`sample_spec({meta['spec_seed']}, i)`, i < "
        f"{meta['n']}), {s['frames']} frames at {s['height']}x{s['width']}"
        + ("" if meta["mode"] == "judge-only" else
           f", {s['steps']} steps, guidance {s['guidance']}, seeds {s['seed']}..{s['seed'] + meta['n'] - 1}, "
           f"{s['device']} / {s['dtype']}, batch {meta['batch_size']}")
        + f". Generated {meta['date']} by `scripts/prompt_following.py` on {meta['machine']}.",
        "",
        "Each video is judged from its pixels alone (`dit_sparse.data.judge.judge_video`): share of the videos "
        "whose shape colour, background colour, motion (for `turning`, with the colour it turns), shape, and all "
        "four match the prompt. Chance: answering with the attributes of another prompt drawn the same way.",
        "",
        "| source | n | " + " | ".join(_column_title(c) for c in COLUMNS) + " | time |",
        "|---|---:|" + "---:|" * len(COLUMNS) + "---:|",
    ]
    for r in rows:
        cells = [_percent(r["accuracy"][c]) for c in COLUMNS]
        lines.append(f"| {r['source']} | {r['n']} | " + " | ".join(cells) + f" | {_time(r)} |")
    lines.append("| chance | - | " + " | ".join(_percent(chance[c]) for c in COLUMNS) + " | - |")
    lines += ["", "Time: generation (s per video) for presets, VAE encode + decode in all for the VAE row.", ""]
    if meta.get("configs"):
        default = SparseAttentionConfig().to_dict()
        lines += ["Configs of your own (`--config`; the fields that differ from `SparseAttentionConfig()`):", ""]
        for label, cfg in meta["configs"].items():
            changed = {k: v for k, v in cfg.items() if v != default.get(k)}
            lines.append(f"- {label}: `{json.dumps(changed)}`" if changed else f"- {label}: the defaults")
        lines.append("")
    lines += ["Mistakes (asked -> judged, count):", ""]
    for r in rows:
        found = {a: m for a, m in misses(records, r["source"]).items() if m}
        text = "; ".join(f"{a}: " + ", ".join(f"{k} ({c})" for k, c in sorted(m.items(), key=lambda kv: -kv[1]))
                         for a, m in found.items())
        lines.append(f"- {r['source']}: {text or 'none'}")
    if sheet:
        lines += ["", "![first generations, asked and judged](prompt_following.png)"]
    lines.append("")
    return "\n".join(lines)


def _column_title(column: str) -> str:
    return {"color": "shape colour", "background": "background", "all_correct": "all four"}.get(column, column)


def _percent(share: float) -> str:
    return f"{share:.1%}" if share == 0 or share >= 0.01 else f"{share:.3%}"  # chance of all four: 0.031%


def _time(row: dict) -> str:
    if "seconds_per_video" in row:
        return f"{row['seconds_per_video']:.2f} s/video"
    if "seconds" in row:
        return f"{row['seconds']:.1f} s"
    return "-"


def contact_sheet(records: list[dict], path: pathlib.Path) -> None:
    """PNG of the kept videos (records with ``"frames"``): per video a caption (prompt; what the judge saw,
    mistakes marked ``[x]``) over :data:`SHEET_FRAMES` frames spread over the video."""
    from PIL import Image, ImageDraw

    kept = [r for r in records if "frames" in r]
    tile = 128
    caption, gap = 30, 4
    width = SHEET_FRAMES * tile + (SHEET_FRAMES - 1) * gap
    sheet = Image.new("RGB", (width, len(kept) * (caption + tile + gap)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, r in enumerate(kept):
        top = row * (caption + tile + gap)
        verdict = r["verdict"]
        seen = ", ".join(f"{a} {verdict[a]['predicted']}" + ("" if verdict[a]["correct"] else " [x]")
                         for a in ATTRIBUTES)
        draw.text((3, top + 2), f"asked: {r['prompt']}", fill=(255, 255, 255))
        draw.text((3, top + 15), f"judged: {seen}", fill=(255, 220, 120))
        frames = r["frames"]
        for k, f in enumerate(np.linspace(0, len(frames) - 1, SHEET_FRAMES).round().astype(int)):
            image = Image.fromarray(frames[f]).resize((tile, tile), Image.BILINEAR)
            sheet.paste(image, (k * (tile + gap), top + caption))
    sheet.save(path, format="PNG")


# ---------------------------------------------------------------------------------------------- main
def config_entry(text: str) -> tuple[str, SparseAttentionConfig]:
    """``LABEL=FILE.json`` of ``--config`` -> (label, config); CLIError saying what is wrong otherwise."""
    label, sep, path = text.partition("=")
    label, path = label.strip(), pathlib.Path(path.strip())
    if not sep or not label or not str(path):
        raise CLIError(f"--config wants LABEL=FILE.json, got {text!r}")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CLIError(f"--config {label}: cannot read {path} ({e.strerror or e})") from e
    except ValueError as e:
        raise CLIError(f"--config {label}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CLIError(f"--config {label}: {path} must hold a JSON object of SparseAttentionConfig fields")
    base = data.pop("preset", None)
    return label, derive_config(None if base is None else str(base), data, f"--config {label}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="local diffusers model folder, or 'default' (embedded model)")
    p.add_argument("--n", type=positive_int, default=DEFAULT_N,
                   help=f"number of held-out prompts (default {DEFAULT_N})")
    p.add_argument("--spec-seed", type=int, default=HELD_OUT_SPEC_SEED,
                   help=f"sample_spec seed of the prompts (default {HELD_OUT_SPEC_SEED}; training uses 0-4)")
    p.add_argument("--seed", type=int, default=0, help="generation seed of the first prompt; prompt i gets seed + i")
    p.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, help=f"frames (default {DEFAULT_FRAMES})")
    p.add_argument("--height", type=positive_int, default=DEFAULT_HEIGHT, help=f"height (default {DEFAULT_HEIGHT})")
    p.add_argument("--width", type=positive_int, default=DEFAULT_WIDTH, help=f"width (default {DEFAULT_WIDTH})")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_NUM_INFERENCE_STEPS,
                   help=f"denoising steps (default {DEFAULT_NUM_INFERENCE_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help=f"guidance scale (default {DEFAULT_GUIDANCE_SCALE})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"videos per pipeline call (default {GPU_BATCH} on CUDA, {CPU_BATCH} on CPU)")
    p.add_argument("--presets", default=REFERENCE,
                   help=f"comma-separated speed presets (default {REFERENCE}; may be empty with --config)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=FILE.json",
                   help="also judge a config of your own, as row LABEL: a JSON file of SparseAttentionConfig "
                        "fields, optionally with \"preset\": NAME as the base they override (repeatable)")
    p.add_argument("--no-vae-ceiling", action="store_true", help="skip the renders-through-the-VAE row")
    p.add_argument("--judge-only", action="store_true",
                   help="no model: judge renders as they are and degraded; writes judge_check.json / .md")
    p.add_argument("--out-dir", default="benchmarks", help="where the report goes (default benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _settings_dict(settings: GenerationSettings, judge_only: bool) -> dict:
    """What decided the videos: their size, and for generations the sampling, device and dtype."""
    keys = ("frames", "height", "width") if judge_only else (
        "model", "frames", "height", "width", "steps", "guidance", "seed", "negative_prompt", "device", "dtype")
    return {k: v for k, v in settings.to_dict().items() if k in keys}


def main(argv: list[str] | None = None) -> int:
    return exit_code("prompt_following", _run, build_parser().parse_args(argv))


def _run(args) -> int:
    settings = GenerationSettings(model=args.model, frames=args.frames, height=args.height, width=args.width,
                                  steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
                                  dtype=args.dtype)
    if args.spec_seed < 0:
        raise CLIError(f"--spec-seed must be >= 0, got {args.spec_seed}")
    if min(args.height, args.width) < 16 or args.frames < 2:
        raise CLIError("the judge needs >= 2 frames of >= 16x16 pixels; raise --frames / --height / --width")
    presets = [n for n in dict.fromkeys(x.strip() for x in args.presets.split(",")) if n]
    if not presets and not args.config:
        raise CLIError("--presets is empty and no --config is given; give e.g. --presets dense,fast")
    configs = [(name, resolve_preset(name)) for name in presets] + [config_entry(e) for e in args.config]
    labels = [label for label, _ in configs]
    clash = sorted({x for x in labels if labels.count(x) > 1 or x in (RENDERS, VAE_ROUND_TRIP, "chance")})
    if clash:
        raise CLIError(f"row label {clash[0]!r} is used twice (or by a reference row); give each --config its own")
    batch = args.batch_size or settings_batch(settings)
    if settings.resolved_device().startswith("cuda"):
        # The judge and the ground-truth renders are many small CPU tensor ops: with every core of a GPU host
        # as an intra-op thread they spin more than they work (H200 host, 32 cores, 16 prompts: 80 s wall,
        # 26 CPU-minutes; 2 threads judge 8 videos in 2.0 s, 1 thread in 2.9 s).
        torch.set_num_threads(min(torch.get_num_threads(), JUDGE_THREADS))
    specs = held_out_specs(args.n, args.spec_seed)
    stem = "judge_check" if args.judge_only else "prompt_following"
    outputs = OutputSet(args.out_dir)
    md_path, json_path = outputs.add(f"{stem}.md"), outputs.add(f"{stem}.json")
    png_path = None if args.judge_only else outputs.add(f"{stem}.png")
    outputs.check()

    with outputs:
        if args.judge_only:
            rows, records = measure_judge(specs, settings)
        else:
            pipe = load(settings)
            check_video_size(pipe, settings)
            try:
                rows, records = measure_renders(specs, settings, None if args.no_vae_ceiling else pipe, batch)
                preset_rows, preset_records = measure_presets(pipe, specs, settings, configs, batch,
                                                              not args.no_progress, keep=SHEET_VIDEOS)
            except torch.cuda.OutOfMemoryError as e:
                raise CLIError(f"CUDA out of memory with {batch} videos at a time; use a smaller --batch-size",
                               code=FAILURE) from e
            rows += preset_rows
            records += preset_records
        info = versions()
        meta = {
            "mode": "judge-only" if args.judge_only else "generate",
            "model": "none (renders)" if args.judge_only else args.model,
            "n": args.n,
            "spec_seed": args.spec_seed,
            "settings": _settings_dict(settings, args.judge_only),
            "batch_size": batch,
            "presets": [] if args.judge_only else presets,
            "configs": {} if args.judge_only else {label: cfg.to_dict() for label, cfg in configs[len(presets):]},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": info["cuda_device"] or f"CPU ({os.cpu_count()} cores)",
        }
        chance = chance_accuracy()
        if png_path is not None:
            contact_sheet(records, outputs.temp(png_path))
        outputs.temp(md_path).write_text(render_markdown(meta, rows, chance, records, png_path is not None))
        write_json(outputs.temp(json_path), clean_for_json({
            **meta, "chance": chance, "rows": rows,
            "videos": [{k: v for k, v in r.items() if k != "frames"} for r in records], "versions": info,
        }))
        outputs.commit()
    for r in rows:
        print(f"{r['source']:<22} " + "  ".join(f"{_column_title(c)} {_percent(r['accuracy'][c])}" for c in COLUMNS))
    print(f"{'chance':<22} " + "  ".join(f"{_column_title(c)} {_percent(chance[c])}" for c in COLUMNS))
    print("wrote " + ", ".join(str(p) for p in (md_path, json_path, png_path) if p is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
