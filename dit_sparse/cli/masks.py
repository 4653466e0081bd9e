"""``dit-sparse masks``: pictures of the block layouts a preset used, one PNG per attention layer.

Runs one short generation with the preset, then renders every block layout the pattern cache holds
(one panel per head, via :func:`dit_sparse.visualize.render_layout`) into ``--out``, with
``masks.json`` listing each picture's layer, pattern, CFG branch and per-head density.
"""

from __future__ import annotations

import argparse
import re

from .errors import CLIError
from .options import add_generation_options, add_preset_option, settings_from_args
from .outputs import OutputSet, write_json
from .report import clean_for_json
from .run import check_video_size, generate, load, resolve_preset, versions

__all__ = ["add_parser", "run", "collect_layouts"]

DEFAULT_STEPS = 3  # enough for the dense warm-up step(s) and one sparse step of every preset


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "masks",
        help="write PNGs of the block layouts each layer and head used with a preset",
        description="Run one short generation with a preset and draw the block layouts its layers used.",
    )
    add_generation_options(p, prompt_required=False, steps=DEFAULT_STEPS)
    add_preset_option(p)
    p.add_argument("--heads", default=None, help="comma-separated head indices to draw (default all)")
    p.add_argument("--out", required=True, help="folder for the PNGs and masks.json (created if missing)")
    p.set_defaults(func=run)


def _parse_heads(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        heads = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise CLIError(f"--heads must be comma-separated head indices such as 0,1,2; got '{text}'") from None
    if not heads or min(heads) < 0:
        raise CLIError(f"--heads must list head indices >= 0; got '{text}'")
    return heads


def _file_name(index: int, layer: str, branch) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer).strip("_") or "layer"
    return f"{index:03d}_{safe}" + ("" if branch is None else f"_branch{branch}") + ".png"


def run(args: argparse.Namespace) -> int:
    from dit_sparse.visualize import render_layout

    settings = settings_from_args(args)
    resolve_preset(args.preset)
    heads = _parse_heads(args.heads)
    outputs = OutputSet(args.out)
    index_path = outputs.add("masks.json")
    outputs.check()

    with outputs:
        pipe = load(settings)
        check_video_size(pipe, settings)
        result = generate(pipe, settings, args.preset, progress=not args.no_progress, collect=collect_layouts)
        entries = result.collected
        if not entries:
            raise CLIError(
                f"preset '{args.preset}' kept no block layouts at {settings.frames}x{settings.height}x{settings.width} "
                f"with {settings.steps} steps (sequence too short for sparse blocks, or only dense steps); "
                "use more frames, a larger size or more --steps",
            )
        pictures = []
        for i, e in enumerate(entries):
            layout = e["layout"]
            shown = None if heads is None else [h for h in heads if h < layout.heads]
            if shown is not None and not shown:
                raise CLIError(f"--heads {args.heads}: layer {e['layer']} has only {layout.heads} heads")
            path = outputs.add(_file_name(i, e["layer"], e["branch"]))
            title = f"{e['layer']} - {e['pattern']}" + ("" if e["branch"] is None else f" (branch {e['branch']})")
            render_layout(layout, outputs.temp(path), heads=shown, title=title)
            pictures.append({
                "file": path.name, "layer": e["layer"], "pattern": e["pattern"], "branch": e["branch"],
                "heads": layout.heads, "q_len": layout.q_len, "kv_len": layout.kv_len,
                "block_q": layout.block_q, "block_kv": layout.block_kv,
                "density_per_head": layout.density()[0].tolist(),
            })
        write_json(outputs.temp(index_path), clean_for_json({
            "command": "masks", "preset": args.preset, "settings": settings.to_dict(), "config": result.config,
            "stats": result.stats, "pictures": pictures, "versions": versions(),
        }))
        outputs.commit()

    print(f"wrote {len(pictures)} layout pictures and masks.json to {args.out}")
    return 0


def collect_layouts(pipe) -> list[dict]:
    """The block layouts the sparse processors of ``pipe`` hold: ``[{layer, pattern, branch, layout}]``.

    They come from the pattern cache of the engine behind the transformer's dit-sparse hook (one engine
    serves both experts of Wan 2.2), whose keys are the canonical JSON ``[layer, pattern, shape, branch]``
    of :class:`~dit_sparse.cache.CacheKey`. Ordered by layer (model order), then pattern and branch.
    """
    import json

    from dit_sparse.hooks import get_hook

    transformer = getattr(pipe, "transformer", pipe)
    hook = get_hook(transformer)
    if hook is None:
        return []
    engine = hook.engine
    order = {info.name: info.index for info in engine.layers.values()}
    entries = []
    for fingerprint, entry in engine.cache._entries.items():
        layer, pattern, _shape, branch = json.loads(fingerprint)
        entries.append({"layer": layer, "pattern": pattern, "branch": branch, "layout": entry.layout})
    entries.sort(key=lambda e: (order.get(e["layer"], len(order)), e["pattern"],
                                -1 if e["branch"] is None else e["branch"]))
    return entries
