"""The fine-tuning loop: SLA installed, parameters chosen, flow-matching steps, checkpoints, outputs.

:func:`finetune` is the whole run (see ``dit_sparse.finetune`` for the user-facing description); the
pieces it stitches together live in their own modules: ``encode`` / ``data`` (batches),
``flow_matching`` (the loss), ``trainable`` (full or LoRA), ``checkpoint`` and ``loss_log``.
"""

from __future__ import annotations

import pathlib

import torch

from .._atomic import atomic_dir
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import RESUME_KEYS, FinetuneConfig, FinetuneResult
from .data import EncodedBatches, open_source
from .encode import check_video_shape
from .flow_matching import eval_sigmas, flow_matching_loss, sample_sigmas, scheduler_shift
from .loss_log import LossLog
from .trainable import TrainableParams, setup_trainable

__all__ = ["finetune", "install_sla", "resolve_device"]

# The loss calls transformer(hidden_states [B, C, F, H, W], timestep, encoder_hidden_states) and the data path
# uses pipe.encode_prompt / the VAE's latents_mean / std as WanPipeline does.
SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel",)
SLA_WEIGHTS_NAME = "sla_weights.safetensors"
LOSS_CSV_NAME = "loss_log.csv"
LOSS_PNG_NAME = "loss.png"


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (None: cuda when available); ValueError for cuda without a GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked but no CUDA GPU is available; use device='cpu'")
    return torch.device(device)


def install_sla(transformer, config: FinetuneConfig) -> dict:
    """Put SLA processors on every self-attention layer of ``transformer``; return ``{layer: SLA module}``.

    Every denoising step runs SLA (no dense warm-up: training sees random timesteps, and inference with
    the trained weights runs SLA throughout).
    """
    from ..apply import apply_sparse_attention, sla_modules
    from ..config import SparseAttentionConfig

    sla_config = SparseAttentionConfig(
        mode="sla",
        dense_steps=0,
        block_size=config.block_size,
        backend=config.backend,
        sla_topk=config.topk,
        sla_feature_map=config.feature_map,
    )
    apply_sparse_attention(transformer, sla_config)
    modules = sla_modules(transformer)
    if not modules:
        raise ValueError(
            f"no self-attention layer of {type(transformer).__name__} runs SLA at this size (head dim or "
            f"sequence too small for block_size={config.block_size}); use a larger video or block_size=64"
        )
    return modules


def finetune(config: FinetuneConfig, pipe=None) -> FinetuneResult:
    """Fine-tune a pipeline's transformer with sparse-linear attention in every self-attention layer.

    Args:
        config: the run (:class:`FinetuneConfig`).
        pipe: an already loaded diffusers pipeline to train (float32 weights); default: load
            ``config.model``. It is modified in place (and moved to the run's device): on return its
            transformer holds the trained weights (LoRA adapters stay attached) and its stock attention
            processors again. The global torch RNG is seeded with ``config.seed``.

    Returns:
        :class:`FinetuneResult` with the loss history and the paths of the SLA weights, the LoRA or full
        transformer weights, the loss CSV / PNG and the last checkpoint.

    Raises:
        ValueError: bad config, missing data folder, a video size the model cannot take, ``out`` holding
            checkpoints without ``resume=True``, a checkpoint from a different setup.
    """
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    cfg = config
    device = resolve_device(cfg.device)
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast needs a CUDA GPU; drop bf16 (--bf16) on CPU")
    existing = latest_checkpoint(cfg.checkpoint_dir)
    if existing is not None and not cfg.resume:
        raise ValueError(
            f"{cfg.out} already holds checkpoints (newest: {existing.name}); pass resume=True (--resume) to "
            f"continue that run or choose another output folder"
        )
    source = open_source(cfg)  # fails fast on a missing / empty data folder, before loading a model
    if pipe is None:
        pipe = _load_pipeline(cfg.model, device)
    transformer = getattr(pipe, "transformer", None)
    if type(transformer).__name__ not in SUPPORTED_TRANSFORMERS:
        raise ValueError(
            f"finetune trains Wan-architecture transformers ({', '.join(SUPPORTED_TRANSFORMERS)}); this pipeline "
            f"has {type(transformer).__name__}"
        )
    if transformer.dtype != torch.float32:
        raise ValueError(
            f"the transformer is {transformer.dtype}; load the pipeline with torch_dtype=torch.float32 (the "
            f"trained master weights) and pass bf16=True for bf16 autocast on CUDA"
        )
    pipe.to(device)
    check_video_shape(pipe, cfg.num_frames, cfg.height, cfg.width)
    torch.manual_seed(cfg.seed)

    for name in ("vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    sla = install_sla(transformer, cfg)
    try:
        params = setup_trainable(transformer, sla, cfg.lora_rank, cfg.lora_alpha)
        for module in sla.values():
            module.to(device)
        if cfg.grad_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        return _train(cfg, pipe, transformer, sla, params, source, device, existing if cfg.resume else None)
    finally:
        from ..apply import remove_sparse_attention

        if cfg.grad_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.eval()
        remove_sparse_attention(transformer)


def _load_pipeline(model: str, device: torch.device):
    from ..pipelines.registry import load_pipeline

    return load_pipeline(model, torch_dtype=torch.float32, device=str(device))


def _train(cfg, pipe, transformer, sla, params: TrainableParams, source, device, checkpoint_path) -> FinetuneResult:
    named = params.named()
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    log = LossLog()
    start = 0
    resumed_from = None
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        _check_resume_config(ckpt.config, cfg, checkpoint_path)
        params.load_state(ckpt.tensors)
        optimizer.load_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng, generator)
        log = ckpt.loss_log
        log.truncate(ckpt.step)
        start = resumed_from = ckpt.step

    batches = EncodedBatches(pipe, source, cfg, device)
    shift = scheduler_shift(pipe.scheduler)
    num_train_timesteps = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    autocast = torch.bfloat16 if cfg.bf16 else None

    def loss_of(latents, embeds, noise, sigmas):
        return flow_matching_loss(transformer, latents, embeds, noise, sigmas, num_train_timesteps, autocast)

    eval_inputs = None
    if cfg.eval_every:
        latents, embeds = batches.get(0)
        eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
        noise = torch.randn(latents.shape, generator=eval_gen).to(device)
        eval_inputs = (latents, embeds, noise, eval_sigmas(latents.shape[0], shift, device))

    def evaluate(step: int) -> None:
        with torch.no_grad():
            log.log(step, eval_loss=loss_of(*eval_inputs).item())

    if eval_inputs is not None and start == 0:
        evaluate(0)
    sla_ids = {id(p) for p in params.sla.values()}
    trained = list(named.values())
    last_ckpt = checkpoint_path
    bar = _progress(cfg, start)
    try:
        for step in range(start, cfg.steps):
            latents, embeds = batches.get(step)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            sigmas = sample_sigmas(latents.shape[0], shift, generator, device)
            loss = loss_of(latents, embeds, noise, sigmas)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss.item()} at step {step + 1}; lower the learning rate (lr={cfg.lr}) or "
                    f"resume from an earlier checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _grad_norm(trained)
            sla_grad_norm = _grad_norm([p for p in trained if id(p) in sla_ids])
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
            optimizer.step()
            done = step + 1
            log.log(done, loss=loss.item(), grad_norm=grad_norm, sla_grad_norm=sla_grad_norm, lr=cfg.lr)
            if eval_inputs is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                evaluate(done)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                last_ckpt = save_checkpoint(
                    cfg.checkpoint_dir, done, params.state(), sla, optimizer, generator, log, cfg.to_dict(),
                    keep=cfg.keep_checkpoints,
                )
                _write_log(cfg, log)
    finally:
        if bar is not None:
            bar.close()

    out = cfg.out_path
    sla_path = _save_sla(sla, out / SLA_WEIGHTS_NAME)
    weights = _save_weights(pipe, transformer, params, out)
    csv_path, png_path = _write_log(cfg, log)
    return FinetuneResult(
        out=out,
        step=cfg.steps if cfg.steps > start else start,
        resumed_from=resumed_from,
        losses=log.column("loss"),
        eval_losses=log.column("eval_loss"),
        sla_weights=sla_path,
        weights=weights,
        loss_csv=csv_path,
        loss_png=png_path,
        checkpoint=pathlib.Path(last_ckpt) if last_ckpt is not None else None,
        config=cfg.to_dict(),
    )


def _check_resume_config(saved: dict, cfg: FinetuneConfig, path) -> None:
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in RESUME_KEYS if k in saved and saved.get(k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: it was trained with other settings ({detail}); use the same ones")


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(grads).norm())


def _progress(cfg, start):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)


def _write_log(cfg, log: LossLog) -> tuple[pathlib.Path, pathlib.Path]:
    out = cfg.out_path
    return log.write_csv(out / LOSS_CSV_NAME), log.plot(out / LOSS_PNG_NAME, title=_title(cfg))


def _title(cfg) -> str:
    mode = f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full"
    return f"SLA fine-tune ({mode}, topk={cfg.topk:g}, {cfg.feature_map})"


def _save_sla(sla: dict, path: pathlib.Path) -> pathlib.Path:
    from ..sla import save_sla_weights

    save_sla_weights(sla, path)  # temp name + rename inside
    return path


def _save_weights(pipe, transformer, params: TrainableParams, out: pathlib.Path) -> pathlib.Path:
    """LoRA adapters into ``out/lora`` (diffusers LoRA format), or the full transformer into ``out/transformer``."""
    if params.lora_config is not None:
        from peft.utils import get_peft_model_state_dict

        if not hasattr(pipe, "save_lora_weights"):
            raise ValueError(f"{type(pipe).__name__} cannot save LoRA weights (no save_lora_weights); use lora_rank=0")
        target = out / "lora"
        layers = get_peft_model_state_dict(transformer)
        with atomic_dir(target) as tmp:
            type(pipe).save_lora_weights(
                tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=params.lora_config.to_dict()
            )
        return target
    target = out / "transformer"
    from ..apply import remove_sparse_attention

    remove_sparse_attention(transformer)  # save the stock model: no dit-sparse state in its files
    with atomic_dir(target) as tmp:
        transformer.save_pretrained(tmp)
    return target
