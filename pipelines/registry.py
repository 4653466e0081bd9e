"""Which video pipelines dit-sparse loads, and from where: the embedded default or a local folder.

``load_pipeline("default")`` gives the embedded tiny Wan model (:mod:`.default_model`);
``load_pipeline("/path/to/folder")`` loads a diffusers pipeline folder (one with ``model_index.json``)
of a known video family: Wan, CogVideoX, HunyuanVideo, LTX-Video or Mochi. Nothing is ever downloaded:
a hub id such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` is refused with a message saying how to
download it yourself. :func:`valid_video_size` rounds a requested size to one the family accepts.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import NamedTuple

import torch

from ._dtype import dtype_kwargs

__all__ = ["KNOWN_VIDEO_PIPELINES", "VideoSize", "load_pipeline", "pipeline_family", "valid_video_size"]

# diffusers pipeline class -> family
KNOWN_VIDEO_PIPELINES: dict[str, str] = {
    "WanPipeline": "wan",
    "CogVideoXPipeline": "cogvideox",
    "HunyuanVideoPipeline": "hunyuan_video",
    "LTXPipeline": "ltx",
    "MochiPipeline": "mochi",
}

# family -> (frames must be temporal * k + 1, height / width must be multiples of spatial); the
# defaults when a pipeline does not say (VAE compression x transformer patch size).
_FAMILY_SIZE_RULES: dict[str, tuple[int, int]] = {
    "wan": (4, 16),
    "cogvideox": (4, 16),
    "hunyuan_video": (4, 16),
    "ltx": (8, 32),
    "mochi": (6, 16),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class VideoSize(NamedTuple):
    frames: int
    height: int
    width: int


def _example_command(model: str) -> str:
    return f"hf download {model} --local-dir /path/to/folder"


def load_pipeline(
    model: str = "default",
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cpu_offload: bool = False,
):
    """Load a video pipeline: ``"default"`` (the embedded model) or a local diffusers folder.

    ``cpu_offload=True`` keeps components on the CPU and moves each to ``device`` while it runs
    (diffusers' ``enable_model_cpu_offload``, needs ``accelerate``); otherwise the whole pipeline moves
    to ``device``. Raises ValueError for a missing folder, a folder without ``model_index.json``, a
    pipeline class outside :data:`KNOWN_VIDEO_PIPELINES`, or a hub id (download it yourself first).
    """
    if not isinstance(model, (str, pathlib.Path)) or not str(model).strip():
        raise ValueError(f"model must be 'default' or a path to a diffusers pipeline folder, got {model!r}")
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype such as torch.bfloat16, got {torch_dtype!r}")
    model = str(model)
    if model == "default":
        from .default_model import build_default_pipeline

        pipe = build_default_pipeline(torch_dtype=torch_dtype)
    else:
        folder = _check_folder(model)
        pipe = _load_folder(folder, torch_dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _check_folder(model: str) -> pathlib.Path:
    folder = pathlib.Path(model).expanduser()
    if not folder.exists():
        if _HUB_ID.match(model) and not model.startswith("."):
            raise ValueError(
                f"{model!r} is not a local folder; it looks like a Hugging Face hub id, but dit-sparse never "
                f"downloads models. Download it yourself (e.g. `{_example_command(model)}`) and pass "
                "--model /path/to/folder."
            )
        raise ValueError(f"model folder {folder} does not exist; pass 'default' or a diffusers pipeline folder")
    if not folder.is_dir():
        raise ValueError(f"model {folder} is a file; pass a diffusers pipeline folder (one with model_index.json)")
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. Pass the folder that "
            "holds model_index.json and the component subfolders (transformer/, vae/, ...)."
        )
    return folder


def _load_folder(folder: pathlib.Path, torch_dtype: torch.dtype):
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {folder / 'model_index.json'}: {e}") from e
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in KNOWN_VIDEO_PIPELINES:
        raise ValueError(
            f"{folder} holds a {class_name or 'unknown'} pipeline; dit-sparse generates with the video "
            f"pipelines {', '.join(sorted(KNOWN_VIDEO_PIPELINES))}"
        )
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs(torch_dtype))
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"could not load the {class_name} in {folder}: {e}") from e


def pipeline_family(pipe) -> str:
    """The family (``"wan"``, ``"ltx"``, ...) of a pipeline object, from its class name."""
    name = type(pipe).__name__
    if name not in KNOWN_VIDEO_PIPELINES:
        raise ValueError(f"{name} is not a known video pipeline; known: {', '.join(sorted(KNOWN_VIDEO_PIPELINES))}")
    return KNOWN_VIDEO_PIPELINES[name]


def _size_rules(pipe) -> tuple[int, int]:
    """(temporal factor, spatial multiple) from the pipeline's own attributes where it has them."""
    family = pipeline_family(pipe)
    temporal, spatial = _FAMILY_SIZE_RULES[family]
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", None)
    if family == "wan":
        temporal = getattr(pipe, "vae_scale_factor_temporal", temporal)
        patch = getattr(config, "patch_size", None)
        if patch is not None:
            spatial = getattr(pipe, "vae_scale_factor_spatial", 8) * int(max(patch[1], patch[2]))
    elif family in ("cogvideox", "hunyuan_video"):
        temporal = getattr(pipe, "vae_scale_factor_temporal", temporal)
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, int):
            spatial = getattr(pipe, "vae_scale_factor_spatial", 8) * patch
    elif family == "ltx":
        temporal = getattr(pipe, "vae_temporal_compression_ratio", temporal)
        patch = getattr(pipe, "transformer_spatial_patch_size", 1)
        spatial = getattr(pipe, "vae_spatial_compression_ratio", 32) * patch
    elif family == "mochi":
        temporal = getattr(pipe, "vae_temporal_scale_factor", temporal)
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, int):
            spatial = getattr(pipe, "vae_spatial_scale_factor", 8) * patch
    return int(temporal), int(spatial)


def valid_video_size(pipe, frames: int, height: int, width: int) -> VideoSize:
    """The valid ``(frames, height, width)`` nearest to the asked one for ``pipe``'s family.

    Frames become ``temporal * k + 1`` (Wan, HunyuanVideo, CogVideoX: 4k+1; LTX: 8k+1; Mochi: 6k+1) and
    height / width multiples of VAE compression x patch size (16, or 32 for LTX), at least one step.
    Ties round up.
    """
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    temporal, spatial = _size_rules(pipe)

    def nearest(value, step, offset):
        k = max(0, int((value - offset) / step + 0.5))
        return k * step + offset

    return VideoSize(
        frames=nearest(frames, temporal, 1),
        height=max(spatial, nearest(height, spatial, 0)),
        width=max(spatial, nearest(width, spatial, 0)),
    )
