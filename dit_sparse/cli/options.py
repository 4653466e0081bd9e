"""Command-line options shared by the commands that generate (``generate``, ``compare``, ``masks``)."""

from __future__ import annotations

import argparse

from .run import DTYPES, GenerationSettings

__all__ = ["add_generation_options", "add_preset_option", "settings_from_args", "positive_int", "DEFAULT_PROMPT"]

# A prompt in the embedded default model's vocabulary (dit_sparse.data.vocabulary).
DEFAULT_PROMPT = "a red circle moving left on a blue background"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_generation_options(p: argparse.ArgumentParser, prompt_required: bool = True, steps: int | None = None) -> None:
    """Add the model / size / sampling / device options; defaults fit the embedded default model on CPU."""
    d = GenerationSettings()
    p.add_argument("--prompt", required=prompt_required, default=DEFAULT_PROMPT,
                   help="text prompt" + ("" if prompt_required else f" (default '{DEFAULT_PROMPT}')"))
    p.add_argument("--negative-prompt", default=None, help="negative prompt, used with guidance > 1 (default: none)")
    p.add_argument("--model", default=d.model, help="local diffusers model folder, or 'default' (embedded model)")
    p.add_argument("--frames", type=positive_int, default=d.frames, help=f"number of frames (default {d.frames})")
    p.add_argument("--height", type=positive_int, default=d.height, help=f"height in pixels (default {d.height})")
    p.add_argument("--width", type=positive_int, default=d.width, help=f"width in pixels (default {d.width})")
    steps = steps or d.steps
    p.add_argument("--steps", type=positive_int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"guidance scale (default {d.guidance})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--fps", type=positive_int, default=d.fps, help=f"frames per second of the video (default {d.fps})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep weights on the CPU, move each module to the GPU while it runs (with --device cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_preset_option(p: argparse.ArgumentParser, default: str = "balanced") -> None:
    from .run import preset_names

    p.add_argument(
        "--preset", default=default,
        help=f"speed preset: {', '.join(preset_names())} (default {default}; see `dit-sparse presets`)",
    )


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model, frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, seed=args.seed,
        fps=args.fps, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload,
    )
