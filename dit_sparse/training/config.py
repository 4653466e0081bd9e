"""`FinetuneConfig` (what a fine-tune run does) and `FinetuneResult` (what it produced), as plain dataclasses.

The config is validated on construction (``ValueError`` naming the field and what to use), JSON-safe
through :meth:`FinetuneConfig.to_dict`, and stored in every checkpoint so a resumed run can check that it
continues the same training.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass, field

__all__ = ["FinetuneConfig", "FinetuneResult", "FEATURE_MAPS", "BACKENDS", "RESUME_KEYS"]

FEATURE_MAPS = ("softmax", "elu", "relu")
BACKENDS = ("auto", "triton", "torch")
# Fields that must match between a checkpoint and the run resuming from it (the trained tensors depend on them).
RESUME_KEYS = ("model", "lora_rank", "topk", "feature_map", "block_size", "num_frames", "height", "width")


@dataclass
class FinetuneConfig:
    """A fine-tune of a diffusers video transformer with sparse-linear attention (SLA) in every self-attention.

    Data and model:
        out: output folder (checkpoints, loss log, final weights).
        model: local diffusers model folder, or ``"default"`` (the embedded default Wan model).
        data: ``"procedural"`` (seeded moving-shapes videos with prompts, made on the fly) or a folder of
            ``.mp4`` videos with captions.
        num_samples: size of the procedural set (ignored for a folder).
        num_frames / height / width: training video size in pixels and frames (``4k+1`` frames, sides
            multiples of 16 for Wan).
        max_sequence_length: text tokens per prompt (padded), as at generation time.

    SLA:
        topk: fraction of key blocks each query block attends to exactly (0.05 = 95% sparse); the rest
            goes through the linear-attention branch.
        feature_map: feature map of the linear branch (``softmax``, ``elu``, ``relu``).
        block_size: SLA query/key block size (64 or 128).
        backend: SLA kernels: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"``, ``"torch"``.

    Optimisation:
        steps: optimizer steps in total (a resumed run continues up to this number).
        batch_size, lr, weight_decay, max_grad_norm (0 = no clipping): AdamW settings.
        lora_rank: 0 trains every transformer parameter; ``r > 0`` trains rank-``r`` LoRA adapters on the
            attention projections (peft). The SLA projections are always trained.
        lora_alpha: LoRA scale numerator (default ``lora_rank``).
        grad_checkpointing: recompute transformer blocks in backward (less memory, ~30% slower).
        bf16: bf16 autocast (CUDA only); master weights stay float32.
        seed: seeds data order, noise and sigmas.

    Bookkeeping:
        save_every: write a checkpoint every N steps (and always at the last step); 0 = only at the end.
        keep_checkpoints: keep only the newest N checkpoints (0 = keep all).
        eval_every: every N steps (and at the start and end) measure the loss on a fixed batch with fixed
            noise and sigmas; 0 = never.
        resume: continue from the newest checkpoint in ``out/checkpoints`` (starts fresh if there is none).
        device: ``"cpu"``, ``"cuda"`` (default: cuda when available).
        progress: show a tqdm progress bar.
    """

    out: str
    model: str = "default"
    data: str = "procedural"
    num_samples: int = 64
    num_frames: int = 33
    height: int = 256
    width: int = 256
    max_sequence_length: int = 512
    topk: float = 0.05
    feature_map: str = "softmax"
    block_size: int = 128
    backend: str = "auto"
    steps: int = 500
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    grad_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 50
    resume: bool = False
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.out = str(self.out)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field that is wrong and what to use instead."""
        if not self.out:
            raise ValueError("out must name an output folder, e.g. out='runs/sla'")
        for name in ("steps", "batch_size", "num_samples", "num_frames", "height", "width", "max_sequence_length"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("lora_rank", "save_every", "keep_checkpoints", "eval_every"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("seed", self.seed, 0)
        if not _is_number(self.topk) or not (0.0 < self.topk <= 1.0):
            raise ValueError(f"topk must be a fraction of key blocks in (0, 1] (0.05 = 95% sparse), got {self.topk!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.block_size not in (64, 128) or isinstance(self.block_size, bool):
            raise ValueError(f"block_size must be 64 or 128, got {self.block_size!r}")
        if not _is_number(self.lr) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number (e.g. 1e-4), got {self.lr!r}")
        for name in ("weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not _is_number(v) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be None or a positive number, got {self.lora_alpha!r}")
        for name in ("grad_checkpointing", "bf16", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.device is not None and self.device != "cpu" and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or None for automatic), got {self.device!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be 'default' or a local diffusers model folder, got {self.model!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be 'procedural' or a folder of .mp4 videos with captions, got {self.data!r}")

    def to_dict(self) -> dict:
        """JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @property
    def out_path(self) -> pathlib.Path:
        return pathlib.Path(self.out)

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.out_path / "checkpoints"


@dataclass
class FinetuneResult:
    """What a run produced.

    * ``step``: optimizer steps done in total (``config.steps``); ``resumed_from``: the checkpoint step a
      resumed run started at (None for a fresh run)
    * ``losses`` / ``eval_losses``: ``(step, loss)`` pairs (the whole run, resumed part included)
    * ``sla_weights``: the SLA weights file, for ``SparseAttentionConfig(mode="sla", ...)``
    * ``weights``: the LoRA folder (``pipe.load_lora_weights(weights)``) or the full transformer folder
      (``WanTransformer3DModel.from_pretrained(weights)``)
    * ``loss_csv`` / ``loss_png``: the loss log and its plot; ``checkpoint``: the last checkpoint folder
    """

    out: pathlib.Path
    step: int
    resumed_from: int | None
    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    sla_weights: pathlib.Path
    weights: pathlib.Path
    loss_csv: pathlib.Path
    loss_png: pathlib.Path
    checkpoint: pathlib.Path | None
    config: dict = field(default_factory=dict)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
