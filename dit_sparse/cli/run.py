"""One video generation with a speed preset: the part ``generate``, ``compare``, ``masks`` and the quality
report share.

:func:`load` turns CLI-level settings into a loaded pipeline (clear :class:`CLIError` for bad model
folders, hub ids, devices and sizes); :func:`generate` runs one generation with a preset applied and
returns the frames, timings and sparse-attention stats; :func:`versions` lists the library versions for
reports.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import FAILURE, CLIError

__all__ = [
    "GenerationSettings", "GenerationResult", "load", "check_video_size", "preset_names", "resolve_preset",
    "derive_config", "parse_variant",
    "generate", "versions",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationSettings:
    """Everything that decides one generation.

    Defaults fit the embedded default model (``dit_sparse.pipelines.default_model``: 33 frames of 256x256
    at 16 fps, guidance 4.0) with fewer steps than its 16 so that a CPU run stays well under a minute.
    """

    prompt: str = ""
    negative_prompt: str | None = None
    model: str = "default"
    frames: int = 33
    height: int = 256
    width: int = 256
    steps: int = 12
    guidance: float = 4.0
    seed: int = 0
    fps: int = 16
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    cpu_offload: bool = False

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.resolved_device() == "cuda" else "float32")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"], d["dtype"] = self.resolved_device(), self.resolved_dtype()
        return d

    def pipeline_kwargs(self) -> dict:
        """The text-to-video pipeline call's arguments these settings fix (all but prompt and generator);
        frames come back as float numpy arrays in [0, 1]."""
        return dict(negative_prompt=self.negative_prompt, num_frames=self.frames, height=self.height,
                    width=self.width, num_inference_steps=self.steps, guidance_scale=self.guidance,
                    output_type="np")


@dataclass
class GenerationResult:
    """Frames float32 ``[F, H, W, C]`` in ``[0, 1]``, wall-clock seconds, and the stats the transformer kept."""

    frames: np.ndarray
    preset: str
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    collected: object = None  # what generate's ``collect`` returned


# ---------------------------------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    """Names of the speed presets, in the preset table's order."""
    from dit_sparse.presets import PRESETS

    return list(PRESETS)


def resolve_preset(name: str):
    """The :class:`SparseAttentionConfig` of preset ``name``; CLIError listing the valid names otherwise."""
    names = preset_names()
    if name not in names:
        raise CLIError(f"unknown preset '{name}'; valid presets: {', '.join(names)}")
    from dit_sparse.config import SparseAttentionConfig

    return SparseAttentionConfig.preset(name)


def derive_config(base: str | None, changes: dict, what: str):
    """A :class:`SparseAttentionConfig`: preset ``base`` (the config defaults when ``None``) with ``changes``
    (field -> value; lists are taken as tuples). CLIError prefixed with ``what`` for an unknown preset, an
    unknown field or a bad value - the one path both ``--variant`` and ``--config`` of the scripts take."""
    from dit_sparse.config import SparseAttentionConfig

    try:
        if base is None:
            return SparseAttentionConfig.from_dict(changes)
        return SparseAttentionConfig.from_dict({**resolve_preset(str(base)).to_dict(), "preset_name": None,
                                                **changes})
    except CLIError as e:
        raise CLIError(f"{what}: {e.message}", e.code) from e
    except (TypeError, ValueError) as e:
        raise CLIError(f"{what}: {' '.join(str(e).split())}") from e


def parse_variant(spec: str, option: str = "--variant"):
    """``PRESET:FIELD=VALUE[:FIELD=VALUE...]`` (values in JSON, bare words as strings) -> the config."""
    import json

    preset, *fields = spec.split(":")
    if not fields:
        raise CLIError(f"{option} {spec!r}: expected PRESET:FIELD=VALUE[:FIELD=VALUE...]")
    changes = {}
    for item in fields:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"{option} {spec!r}: {item!r} is not FIELD=VALUE")
        try:
            changes[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key.strip()] = raw
    return derive_config(preset.strip(), changes, f"{option} {spec!r}")


# ---------------------------------------------------------------------------------------------- loading
def note_prompt(settings: GenerationSettings) -> None:
    """On stderr, a note when the embedded default model gets a prompt outside the grammar it was trained on
    (it still generates)."""
    if settings.model == "default":
        from dit_sparse.pipelines.default_model import prompt_note

        note = prompt_note(settings.prompt)
        if note is not None:
            print(note, file=sys.stderr)


def load(settings: GenerationSettings):
    """Load the pipeline for ``settings`` (model folder or "default") on its device and dtype."""
    device = settings.resolved_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CLIError(f"unknown device '{device}'; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked but no CUDA GPU is available; use --device cpu")
    if settings.cpu_offload and not device.startswith("cuda"):
        raise CLIError("--cpu-offload moves modules to the GPU in turn; use it with --device cuda")
    dtype_name = settings.resolved_dtype()
    if dtype_name not in DTYPES:
        raise CLIError(f"unknown dtype '{dtype_name}'; use one of {', '.join(DTYPES)}")
    from dit_sparse.pipelines.registry import load_pipeline

    try:
        return load_pipeline(
            settings.model, torch_dtype=DTYPES[dtype_name], device=device, cpu_offload=settings.cpu_offload
        )
    except ValueError as e:
        raise CLIError(_one_line(e)) from e
    except torch.cuda.OutOfMemoryError as e:
        raise CLIError(
            f"CUDA out of memory while loading the model onto {device}; try --cpu-offload or --dtype bfloat16",
            code=FAILURE,
        ) from e


def check_video_size(pipe, settings: GenerationSettings) -> None:
    """CLIError naming the nearest valid values when the model cannot make frames x height x width."""
    from dit_sparse.pipelines.registry import valid_video_size

    asked = (settings.frames, settings.height, settings.width)
    nearest = tuple(valid_video_size(pipe, *asked))
    if nearest != asked:
        raise CLIError(
            f"the model cannot make {asked[0]} frames at {asked[1]}x{asked[2]}; nearest valid: "
            f"--frames {nearest[0]} --height {nearest[1]} --width {nearest[2]}"
        )


# ---------------------------------------------------------------------------------------------- running
def generate(pipe, settings: GenerationSettings, preset: str, progress: bool = True, collect=None) -> GenerationResult:
    """Generate one video with ``preset`` applied to ``pipe`` (and removed again afterwards).

    A progress bar advances once per denoising step (on stderr). ``collect(pipe)``, if given, runs after
    the generation while the preset is still applied; its result lands in ``GenerationResult.collected``.
    CUDA out-of-memory becomes a CLIError suggesting ``--cpu-offload`` or a faster preset.
    """
    from tqdm.auto import tqdm

    config = resolve_preset(preset)
    try:
        _apply(pipe, config)
    except ValueError as e:
        raise CLIError(f"cannot apply preset '{preset}': {_one_line(e)}") from e
    step_times: list[float] = []
    # Every denoising step redraws the bar (a step takes far longer than a redraw); tqdm's default
    # throttling would skip ticks of fast steps, and the last one before the bar is cleared.
    bar = tqdm(total=settings.steps, desc=f"{preset}", unit="step", disable=not progress, leave=False,
               mininterval=0, miniters=1)
    last = [0.0]

    def on_step_end(_pipe, _step, _timestep, callback_kwargs):
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        bar.update(1)
        return callback_kwargs

    pipe.set_progress_bar_config(disable=True)  # ours replaces the pipeline's own bar
    try:
        _sync(settings)
        start = last[0] = time.perf_counter()
        out = pipe(prompt=settings.prompt, generator=torch.Generator("cpu").manual_seed(settings.seed),
                   callback_on_step_end=on_step_end, **settings.pipeline_kwargs())
        _sync(settings)
        seconds = time.perf_counter() - start
        stats = _stats(pipe)
        collected = collect(pipe) if collect is not None else None
    except torch.cuda.OutOfMemoryError as e:
        raise CLIError(
            f"CUDA out of memory with preset '{preset}' at {settings.frames}x{settings.height}x{settings.width}; "
            "try --cpu-offload, a faster preset (fast, turbo), or fewer frames / a smaller size",
            code=FAILURE,
        ) from e
    finally:
        bar.close()
        _remove(pipe)
    frames = np.asarray(out.frames[0], dtype=np.float32)
    return GenerationResult(frames, preset, seconds, step_times, stats, _config_dict(config), collected)


def _apply(pipe, config) -> None:
    from dit_sparse.apply import apply_sparse_attention

    apply_sparse_attention(pipe, config)


def _remove(pipe) -> None:
    from dit_sparse.apply import remove_sparse_attention

    remove_sparse_attention(pipe)


def _stats(pipe) -> dict:
    transformer = getattr(pipe, "transformer", pipe)
    fn = getattr(transformer, "sparse_attention_stats", None)
    return dict(fn()) if fn is not None else {}


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else asdict(config)


def _sync(settings: GenerationSettings) -> None:
    if settings.resolved_device().startswith("cuda"):
        torch.cuda.synchronize()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------------------------------------- reports
def versions() -> dict:
    """Versions of Python, dit-sparse and the libraries a generation depends on, plus the device name."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("dit-sparse", "torch", "diffusers", "transformers", "triton", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out
