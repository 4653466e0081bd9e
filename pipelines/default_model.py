"""The embedded default text-to-video model: a tiny Wan-architecture model that ships inside dit-sparse.

Every component is a stock diffusers / transformers class, so the shipped folder is an ordinary
``diffusers.WanPipeline`` folder (``WanPipeline.from_pretrained(folder)`` loads it offline):

* ``transformer`` - ``WanTransformer3DModel``: 6 layers, 4 heads of head_dim 64, patch (1, 2, 2)
* ``vae`` - ``AutoencoderKLWan``: z_dim 16, 4x temporal / 8x spatial compression (base_dim 16,
  Wan 2.2's residual blocks)
* ``text_encoder`` - ``UMT5EncoderModel``: 2 layers, d_model 128
* ``tokenizer`` - word-level over :data:`dit_sparse.data.VOCABULARY` (:mod:`.word_tokenizer`)
* ``scheduler`` - ``UniPCMultistepScheduler`` with flow sigmas (shift 3), as Wan 2.1 ships

It is trained by ``scripts/train_default_model.py`` on the procedural video set
(:mod:`dit_sparse.data.procedural`): ask for e.g. ``"a red circle moving left on a blue background"``.
At the default size, 33 frames of 256x256, the transformer sees 9 x 16 x 16 = 2304 video tokens, long
enough for sparse attention to matter. The weights live in the package folder ``default_model/`` (next
to this module) as safetensors; :func:`build_default_pipeline` loads them, or builds the same
architecture with random weights when asked or while none are shipped.

The model was trained with the pipeline's default ``max_sequence_length`` (512): keep it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
import shutil
import uuid
import warnings

import torch

from dit_sparse.data.vocabulary import VOCABULARY

from ._dtype import dtype_kwargs
from .word_tokenizer import SPECIAL_TOKENS, build_word_tokenizer, save_word_tokenizer

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_FRAMES",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_HEIGHT",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_WIDTH",
    "SCHEDULER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "TRANSFORMER_CONFIG",
    "VAE_CONFIG",
    "build_default_components",
    "build_default_pipeline",
    "default_model_path",
    "prompt_note",
    "save_default_model",
]

# What the default model generates: 33 frames -> 9 latent frames; 256 px -> 32 latent px -> 16 tokens.
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FPS = 33, 256, 256, 16
DEFAULT_NUM_INFERENCE_STEPS = 12  # UniPC; ~12 steps keep a 2-core CPU run near half a minute
DEFAULT_GUIDANCE_SCALE = 4.0
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default; the model is trained with it

Z_DIM = 16
TEXT_DIM = 128

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

VAE_CONFIG = dict(
    base_dim=16,
    decoder_base_dim=16,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    # Wan 2.2's residual down / up blocks: their parameter-free shortcuts (space-to-channel averages and
    # duplications) carry the signal through the whole VAE, so this tiny one trains in minutes.
    is_residual=True,
    # Set from the encoded training data by the training script; identity until then.
    latents_mean=[0.0] * Z_DIM,
    latents_std=[1.0] * Z_DIM,
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=len(SPECIAL_TOKENS) + len(VOCABULARY),
    d_model=TEXT_DIM,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_decoder_layers=0,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)

_WEIGHTS_FOLDER = "default_model"


def default_model_path() -> pathlib.Path:
    """The package folder that holds the shipped weights (``dit_sparse/pipelines/default_model``)."""
    return pathlib.Path(str(importlib.resources.files("dit_sparse.pipelines") / _WEIGHTS_FOLDER))


def prompt_note(prompt: str) -> str | None:
    """A one-line note for a prompt outside the grammar the default model was trained on
    (:func:`dit_sparse.data.vocabulary.parse_prompt`), None for a prompt inside it. Such a prompt still
    generates, but the model has only ever seen its own grammar: "a red circle moving left", with no
    background, gives a frame filled with red."""
    from dit_sparse.data.vocabulary import parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError as e:
        return (f"note: the default model was trained only on prompts like 'a green ring growing on a black "
                f"background', so expect little of what this one asks; {e}")
    return None


def has_shipped_weights() -> bool:
    return (default_model_path() / "model_index.json").is_file()


def build_default_components(seed: int = 0) -> dict:
    """Randomly initialised components of the default model (float32), deterministic for ``seed``.

    Returns the keyword arguments of ``WanPipeline``: transformer, vae, text_encoder, tokenizer, scheduler.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan(**VAE_CONFIG)
        text_encoder = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG))
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_word_tokenizer(VOCABULARY, model_max_length=MAX_SEQUENCE_LENGTH),
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
    )


def build_default_pipeline(random_init: bool = False, torch_dtype: torch.dtype = torch.float32, seed: int = 0):
    """The embedded default text-to-video model as a ``diffusers.WanPipeline`` (on CPU).

    Loads the shipped weights, or - with ``random_init=True``, or with a warning while no weights are
    shipped - builds the same architecture with random weights (``seed`` makes them reproducible).

    Example::

        pipe = build_default_pipeline()
        video = pipe("a red circle moving left on a blue background", num_frames=33, height=256,
                     width=256, num_inference_steps=16).frames[0]   # float [33, 256, 256, 3] in [0, 1]
    """
    from diffusers import WanPipeline

    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype such as torch.float32, got {torch_dtype!r}")
    if not random_init and has_shipped_weights():
        folder = str(default_model_path())
        return WanPipeline.from_pretrained(folder, local_files_only=True, **dtype_kwargs(torch_dtype))
    if not random_init:
        warnings.warn(
            f"no trained default model is shipped in {default_model_path()}; using RANDOM weights, so videos "
            "will be noise. Train one with scripts/train_default_model.py.",
            stacklevel=2,
        )
    pipe = WanPipeline(**build_default_components(seed))
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)


def _cast_weights(component_folder: pathlib.Path, model, dtype: torch.dtype) -> None:
    """Store the floating-point weights of a saved component in ``dtype``, except the modules the model
    keeps in float32 (its ``_keep_in_fp32_modules``: norms, time embedding, modulation tables)."""
    from safetensors.torch import load_file, save_file

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for path in component_folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        for key, t in tensors.items():
            if t.is_floating_point() and not keep.intersection(key.split(".")):
                tensors[key] = t.to(dtype).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})


def save_default_model(
    pipe, folder, weights_dtype: torch.dtype | None = torch.float16, extra_files: dict | None = None
) -> pathlib.Path:
    """Write ``pipe`` (a ``WanPipeline``) as a diffusers folder at ``folder``, atomically.

    Everything is written into a temporary folder next to ``folder`` and renamed into place, so
    ``folder`` is either the old model or the complete new one. A previous ``folder`` is replaced whole.
    ``weights_dtype`` stores the transformer and VAE weights in that dtype (fp16 halves the size; None keeps
    them as they are); the text encoder stays as it is. ``extra_files`` maps file names to text written
    alongside (e.g. ``README.md``, ``train_log.csv``). Returns ``folder`` as a Path.
    """
    from diffusers import WanPipeline

    if not isinstance(pipe, WanPipeline):
        raise ValueError(f"save_default_model takes a diffusers WanPipeline, got {type(pipe).__name__}")
    folder = pathlib.Path(folder)
    for name in extra_files or {}:
        if pathlib.Path(name).name != name or name in ("model_index.json",):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than model_index.json")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if weights_dtype is not None:
            for name in ("transformer", "vae"):
                _cast_weights(tmp / name, getattr(pipe, name), weights_dtype)
        # Tokenizer files and class name that transformers 4 and 5 both read (see word_tokenizer).
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        save_word_tokenizer(pipe.tokenizer, tmp / "tokenizer")
        for config_path in tmp.glob("*/config.json"):  # where a loaded model came from is no part of it
            config = json.loads(config_path.read_text())
            if config.pop("_name_or_path", None) is not None:
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
