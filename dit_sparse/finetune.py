"""``dit-sparse finetune``: fine-tune a diffusers video transformer with sparse-linear attention (SLA).

Every self-attention layer gets an SLA module (exact attention on the top ``topk`` key blocks, a linear
attention branch for the rest, mixed through a zero-initialised projection); the transformer is then
trained with Wan's flow-matching objective so it adapts to the sparse attention. Training data is the
seeded procedural moving-shapes set (made on the fly) or a folder of ``.mp4`` videos with captions,
encoded with the pipeline's own VAE and text encoder.

Outputs under ``--out``: ``sla_weights.safetensors`` (for ``SparseAttentionConfig(mode="sla", ...)``),
``lora/`` (diffusers LoRA format, ``pipe.load_lora_weights``) or ``transformer/`` (full weights,
diffusers format), ``loss_log.csv`` + ``loss.png``, and ``checkpoints/step-N/`` every ``--save-every``
steps for ``--resume``.

Python::

    from dit_sparse.finetune import FinetuneConfig, finetune

    result = finetune(FinetuneConfig(out="runs/sla", steps=300, lora_rank=16, topk=0.05))
    print(result.losses[-1], result.sla_weights)

Command line::

    dit-sparse finetune --data procedural --out runs/sla --steps 300 --lora-rank 16 --bf16
"""

from __future__ import annotations

import argparse

from .training.config import BACKENDS, FEATURE_MAPS, FinetuneConfig, FinetuneResult

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "add_parser", "run", "config_from_args"]


def finetune(config: FinetuneConfig, pipe=None) -> FinetuneResult:
    """Run a fine-tune (see :func:`dit_sparse.training.loop.finetune` for the details)."""
    from .training.loop import finetune as _finetune

    return _finetune(config, pipe=pipe)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``finetune`` on the ``dit-sparse`` sub-command parsers; its ``func`` is :func:`run`."""
    d = FinetuneConfig(out="out")
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a transformer with sparse-linear attention (SLA)",
        description="Fine-tune a video transformer with sparse-linear attention in every self-attention layer.",
    )
    p.add_argument("--model", default=d.model, help="local diffusers model folder, or 'default' (embedded model)")
    p.add_argument("--data", default=d.data, help="'procedural' or a folder of .mp4 videos with captions")
    p.add_argument("--out", required=True, help="output folder (checkpoints, loss log, weights)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"videos per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0 = off)")
    p.add_argument("--topk", type=float, default=d.topk, help=f"key blocks kept exactly (default {d.topk:g})")
    p.add_argument("--feature-map", choices=FEATURE_MAPS, default=d.feature_map, help="linear-branch feature map")
    p.add_argument("--block-size", type=int, choices=(64, 128), default=d.block_size, help="SLA block size")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="SLA kernels (auto: Triton on CUDA)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (0 = train all parameters)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of data order, noise and sigmas (default {d.seed})")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0 = at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest N kept (0 = all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="fixed-batch eval loss every N steps (0 = off)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="size of the procedural set")
    p.add_argument("--frames", type=int, default=d.num_frames, help=f"frames per video (default {d.num_frames})")
    p.add_argument("--height", type=int, default=d.height, help=f"height in pixels (default {d.height})")
    p.add_argument("--width", type=int, default=d.width, help=f"width in pixels (default {d.width})")
    p.add_argument("--max-sequence-length", type=int, default=d.max_sequence_length, help="text tokens per prompt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed ``finetune`` arguments (ValueError for bad values)."""
    return FinetuneConfig(
        out=args.out, model=args.model, data=args.data, num_samples=args.num_samples, num_frames=args.frames,
        height=args.height, width=args.width, max_sequence_length=args.max_sequence_length, topk=args.topk,
        feature_map=args.feature_map, block_size=args.block_size, backend=args.backend, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, grad_checkpointing=args.grad_checkpointing,
        bf16=args.bf16, seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        eval_every=args.eval_every, resume=args.resume, device=args.device, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """``dit-sparse finetune``: run it and print where the outputs are; bad input becomes a ``CLIError``."""
    from .cli.errors import FAILURE, CLIError

    try:
        config = config_from_args(args)
        result = finetune(config)
    except ValueError as e:  # bad input the user can fix
        raise CLIError(_one_line(e)) from e
    except FloatingPointError as e:  # the run diverged
        raise CLIError(_one_line(e), code=FAILURE) from e
    last = result.losses[-1][1] if result.losses else float("nan")
    print(f"finetune: {result.step} steps, last loss {last:.4f}")
    print(f"  SLA weights: {result.sla_weights}")
    print(f"  {'LoRA' if config.lora_rank else 'transformer'} weights: {result.weights}")
    print(f"  loss log: {result.loss_csv} ({result.loss_png.name})")
    return 0


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
