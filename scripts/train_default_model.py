"""Train the embedded default text-to-video model (a tiny Wan) on the procedural video set.

Two phases, each with a wall-clock budget, on one GPU (bf16 autocast):

1. VAE (``--vae-minutes``): ``AutoencoderKLWan`` as an autoencoder (L1 + MSE + a small KL) on random
   crops of procedural videos rendered on the GPU, from zero-initialised residual branches and a
   standardised latent (:func:`init_vae_for_training`; without it the tiny VAE learns slowly and, at
   higher learning rates, collapses to one constant output). Most steps take FULL-length clips (33 frames) at small
   crops: the Wan VAE encodes 4 frames and decodes 1 latent frame at a time, carrying a causal feature
   cache from chunk to chunk, so clips shorter than the generated videos never train the later chunks
   (their frames wash out). Every few steps a short clip at a larger crop adds spatial context. The loss
   is taken on the decoder's output before ``decode`` clamps it to [-1, 1] (the clamp has no gradient
   outside that range, so a saturated frame could never recover). Then the per-channel latent mean / std
   of full-size videos go into the VAE config (``latents_mean`` / ``latents_std``, as WanPipeline expects).
2. Transformer (``--dit-minutes``): ``WanTransformer3DModel`` + the tiny ``UMT5EncoderModel`` with Wan's
   flow-matching loss: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, ``s = shift u / (1 + (shift
   - 1) u)`` with ``u ~ U(0, 1)``, timestep ``1000 s``; the empty prompt replaces 10 % of the prompts
   (classifier-free guidance). Latents come from a bank on the GPU that the frozen VAE keeps refreshing
   with newly rendered videos, so encoding costs a fraction of each step. EMA weights are saved.

Both phases warm the learning rate up linearly (over a number of steps, but never past a tenth of the
phase's time budget), then follow a cosine over the time budget down to 10 %. The defaults fit one
9-minute GPU call (about 8 minutes of training plus setup, saving and samples); the log prints an ETA.

After training it generates ``judge_prompts`` (48) held-out prompts and judges each video from its pixels
(:mod:`dit_sparse.data.judge`, as ``scripts/prompt_following.py`` does), so every run records how well the
model follows prompts. It writes the diffusers folder (``--out``; fp16 weights, about 21 MB, 14 files) with
``README.md`` (data, steps, losses, prompt following, time, GPU, date) and ``train_log.csv``, then reloads it and writes four sample files to
``--samples-dir``: ``samples.mp4`` (all sample prompts tiled), ``samples_grid.png``, ``prompts.txt`` and
``vae_reconstruction_grid.png``. ``--archive FILE`` also packs the folder as a tar split into 15 MiB parts
``FILE.00``, ``FILE.01`` (for machines that hand back few, small files). ``--gpus N`` with ``--resume-from``
trains the transformer data-parallel on N GPUs (one process each, DDP; each rank renders its own videos,
``--dit-batch`` per GPU, so N times the videos per second). ``--smoke`` runs a few tiny steps
on the CPU to check the whole path.

    python scripts/train_default_model.py                      # -> pipelines/default_model, out/default_model_samples
    python scripts/train_default_model.py --out /tmp/model --samples-dir $OUT/samples --archive $OUT/default_model.tar
    python scripts/train_default_model.py --resume-from pipelines/default_model --gpus 2 --dit-minutes 8 --dit-batch 64
    python scripts/train_default_model.py --smoke --out /tmp/default_model --samples-dir /tmp/samples
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import pathlib
import platform
import random
import re
import sys
import tarfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _use_checkout_if_not_installed() -> None:
    """Run from a source checkout that is not pip-installed (a bare GPU machine, say): put the checkout on
    the path and map ``dit_sparse.pipelines`` / ``dit_sparse.kernels`` to their folders, as
    pyproject.toml's package-dir does for an install."""
    try:
        import dit_sparse.pipelines  # noqa: F401
    except ImportError:
        root = pathlib.Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(root))
        import dit_sparse

        dit_sparse.__path__.append(str(root))


_use_checkout_if_not_installed()

from dit_sparse.data import (  # noqa: E402
    HELD_OUT_SPEC_SEED, held_out_specs, judge_video, render_videos, sample_spec, video_to_model_input,
)
from dit_sparse.data.judge import accuracy  # noqa: E402
from dit_sparse.pipelines.default_model import (  # noqa: E402
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_HEIGHT,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_WIDTH,
    MAX_SEQUENCE_LENGTH,
    SCHEDULER_CONFIG,
    build_default_components,
    save_default_model,
)

SAMPLE_PROMPTS = (
    "a red circle moving left on a blue background",
    "a yellow square moving right on a checkered purple background",
    "a white triangle bouncing on a black background",
    "a green ring growing on a striped orange background",
    "a blue diamond turning red on a white background",
    "an orange circle moving down on a dotted green background",
)

TRAIN_FLOW_SHIFT = 1.0  # see TrainConfig.flow_shift


@dataclass
class TrainConfig:
    seed: int = 0
    # VAE phase
    vae_minutes: float = 2.75
    vae_max_steps: int = 1_000_000
    vae_batch: int = 16
    vae_frames: int = DEFAULT_FRAMES  # full-length clips: every latent chunk of the causal cache is trained
    vae_crop: int = 64
    vae_short_every: int = 4  # every n-th step a short clip at a larger crop (spatial context); 0: never
    vae_short_frames: int = 9
    vae_short_crop: int = 128
    vae_lr: float = 3e-4  # 1e-3 makes this VAE collapse to a constant output
    vae_kl_weight: float = 1e-6
    vae_warmup_steps: int = 40
    stats_videos: int = 64
    # transformer phase
    dit_minutes: float = 5.25
    dit_max_steps: int = 1_000_000
    dit_batch: int = 32  # ~2x the steps of batch 64 in the same time; a 7M model needs steps more than batch
    dit_lr: float = 6e-4
    dit_warmup_steps: int = 100
    cfg_dropout: float = 0.1
    # Training noise levels: uniform (shift 1), not the sampler's shift 3. Measured on the default model
    # (2026-11-30, 48 held-out prompts): three runs at shift 3 left the asked shape at 8-15% (chance 20%);
    # one at 1.5 took it to 17%, two at 1.0 to 25% and 38% (motion 75% -> 92%). Outlines form at low noise,
    # which shift 3 rarely trains.
    flow_shift: float = TRAIN_FLOW_SHIFT
    ema_decay: float = 0.999
    bank_size: int = 3072
    bank_refresh: int = 16  # videos rendered + encoded per refresh
    bank_refresh_every: int = 2  # steps between refreshes
    encode_batch: int = 32
    # both
    frames: int = DEFAULT_FRAMES
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    warmup_fraction: float = 0.1  # warm-up ends by this fraction of a phase's budget at the latest
    grad_clip: float = 1.0
    # samples
    sample_prompts: int = len(SAMPLE_PROMPTS)
    judge_prompts: int = 48  # held-out prompts generated and judged after training (0: none)
    sample_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE


def smoke_config(seed: int) -> TrainConfig:
    """A handful of tiny steps: checks every code path on a CPU in seconds."""
    return TrainConfig(
        seed=seed, vae_minutes=1.0, vae_max_steps=2, vae_batch=1, vae_frames=9, vae_crop=16, vae_short_every=2,
        vae_short_frames=5, vae_short_crop=32, vae_warmup_steps=1, stats_videos=2, dit_minutes=1.0,
        dit_max_steps=2, dit_batch=2, dit_warmup_steps=1, bank_size=4, bank_refresh=2, bank_refresh_every=1,
        encode_batch=2, frames=9, height=64, width=64, sample_prompts=1, sample_steps=2, judge_prompts=2,
    )


def check_config(cfg: TrainConfig) -> None:
    """Raise ValueError for settings the Wan VAE or the loops cannot use."""
    for name in ("vae_frames", "vae_short_frames", "frames"):
        f = getattr(cfg, name)
        if f < 1 or (f - 1) % 4:
            raise ValueError(f"{name}={f}: the Wan VAE takes 4k + 1 frames (1, 5, 9, ..., 33); pick one of those")
    for name in ("vae_crop", "vae_short_crop", "height", "width"):
        v = getattr(cfg, name)
        if v < 8 or v % 8:
            raise ValueError(f"{name}={v}: must be a positive multiple of 8 (the VAE's spatial compression)")
    for name in ("vae_batch", "dit_batch", "bank_size", "bank_refresh", "bank_refresh_every", "encode_batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.vae_short_every < 0:
        raise ValueError(f"vae_short_every must be >= 0 (0: never), got {cfg.vae_short_every}")
    if cfg.vae_minutes <= 0 or cfg.dit_minutes <= 0:
        raise ValueError(f"--vae-minutes and --dit-minutes must be positive, got {cfg.vae_minutes}, {cfg.dit_minutes}")
    if not 0 < cfg.warmup_fraction <= 1:
        raise ValueError(f"warmup_fraction must be in (0, 1], got {cfg.warmup_fraction}")
    if not (math.isfinite(cfg.flow_shift) and cfg.flow_shift > 0):
        raise ValueError(f"--flow-shift must be a positive number, got {cfg.flow_shift}")


class TrainLog:
    """Per-step rows (phase, step, elapsed_s, loss, lr, note) for ``train_log.csv``, echoed to stdout.

    Losses arrive as GPU tensors and are read back every ``every`` steps, so logging does not make the
    host wait for the GPU at each step.
    """

    FIELDS = ("phase", "step", "elapsed_s", "loss", "lr", "note")

    def __init__(self, every: int, quiet: bool = False):
        self.rows, self.pending, self.every, self.start = [], [], every, time.time()
        self.phase_end, self.budget_after = None, 0.0
        self.quiet = quiet  # keep the rows, print nothing (the ranks after the first of a data-parallel run)

    def plan(self, budget_s: float, budget_after_s: float) -> None:
        """The phase starting now ends within ``budget_s`` seconds; the training phases after it have
        ``budget_after_s`` seconds together (for the ETA in the printed lines)."""
        self.phase_end, self.budget_after = time.time() + budget_s, budget_after_s

    def eta_text(self) -> str:
        if self.phase_end is None:
            return ""
        left = max(0.0, self.phase_end - time.time())
        return f" | phase ends in {left:.0f}s, training ends in {left + self.budget_after:.0f}s (then save + samples)"

    def add(self, phase: str, step: int, loss: torch.Tensor, lr: float, **extra: torch.Tensor) -> None:
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in extra.values())])
        self.pending.append((phase, step, round(time.time() - self.start, 1), lr, list(extra), values))
        if (step + 1) % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([p[-1] for p in self.pending]).cpu().tolist()  # one device sync
        for (phase, step, elapsed, lr, names, _), vals in zip(self.pending, values):
            note = " ".join(f"{n} {v:.4f}" for n, v in zip(names, vals[1:]))
            self.rows.append(dict(phase=phase, step=step, elapsed_s=elapsed, loss=vals[0], lr=lr, note=note))
        row = self.rows[-1]
        if not self.quiet:
            print(f"[{row['elapsed_s']:7.1f}s] {row['phase']} step {row['step']:6d} loss {row['loss']:.5f} "
                  f"lr {row['lr']:.2e} {row['note']}{self.eta_text()}", flush=True)
        self.pending = []

    def csv_text(self) -> str:
        self.flush()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()

    def final_loss(self, phase: str, last: int = 50) -> float:
        self.flush()
        losses = [r["loss"] for r in self.rows if r["phase"] == phase]
        return float(np.mean(losses[-last:])) if losses else float("nan")


def lr_factor(step: int, elapsed_fraction: float, warmup: int, warmup_fraction: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps - cut short to end by ``warmup_fraction`` of the time budget
    when steps are slow (a short run must not spend itself warming up) - then a cosine over the time
    budget (``elapsed_fraction`` in [0, 1]) down to 10 %."""
    warm = min(1.0, max((step + 1) / max(1, warmup), elapsed_fraction / warmup_fraction))
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_fraction)))
    return warm * cosine


class SpecStream:
    """Consecutive procedural specs of one seed: ``next(n)`` gives the next ``n``."""

    def __init__(self, seed: int):
        self.seed, self.index = seed, 0

    def next(self, n: int):
        specs = [sample_spec(self.seed, self.index + i) for i in range(n)]
        self.index += n
        return specs


def render_batch(stream: SpecStream, n: int, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, list]:
    """``n`` new videos as ``[n, 3, F, H, W]`` in [-1, 1] on ``device``, and their prompts."""
    specs = stream.next(n)
    videos = render_videos(specs, frames, height, width, device=device)
    return video_to_model_input(videos), [s.prompt for s in specs]


# Rank r of a data-parallel run draws its videos from spec seed ``seed * 2 + 2 + r * this`` (rank 0 as a
# one-GPU run; held-out prompts use HELD_OUT_SPEC_SEED, 777).
_RANK_STREAM_OFFSET = 1000


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------------------- VAE phase


def halved_batch_after_oom(err: RuntimeError, batch: int, opt, phase: str) -> int:
    """The batch size to retry a training step with after ``err``: half of ``batch`` when ``err`` is a
    CUDA out-of-memory error (gradients dropped, cache emptied); any other error, or one at batch 1, is
    raised again."""
    if not is_oom(err) or batch == 1:
        raise err
    opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    batch = max(1, batch // 2)
    print(f"{phase}: out of memory, batch size now {batch}", flush=True)
    return batch


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z)`` [N, 3, F, H, W] before its final clamp to [-1, 1].

    ``AutoencoderKLWan.decode`` runs its decoder once per latent frame (with the causal feature cache) and
    clamps the concatenated frames; the clamp has zero gradient outside [-1, 1], so a loss on its output
    cannot pull back a frame that has saturated (e.g. washed out to white). A forward hook collects the
    decoder's per-frame outputs instead; clamping them gives ``vae.decode(z).sample`` exactly.
    """
    if getattr(vae.config, "patch_size", None) is not None or getattr(vae, "use_tiling", False):
        raise ValueError("decode_unclamped needs a Wan VAE without patch_size and with tiling off "
                         "(call vae.disable_tiling()); the default model's VAE has neither")
    chunks = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: chunks.append(out))
    try:
        vae.decode(z)
    finally:
        handle.remove()
    return torch.cat(chunks, dim=2)


def vae_clip_shape(step: int, cfg: TrainConfig) -> tuple[int, int]:
    """(frames, crop) of the VAE clips at ``step``: full-length small crops, every ``vae_short_every``-th
    step a short clip at a larger crop."""
    if cfg.vae_short_every and step % cfg.vae_short_every == cfg.vae_short_every - 1:
        return cfg.vae_short_frames, cfg.vae_short_crop
    return cfg.vae_frames, cfg.vae_crop


@torch.no_grad()
def init_vae_for_training(vae, x: torch.Tensor) -> None:
    """Initialisation that lets a VAE trained from scratch learn in minutes (measured on CPU: L1 0.17
    after 300 steps instead of 0.37, and no collapse to a constant output):

    * every residual branch (the second conv of each ``WanResidualBlock``, the output projection of each
      ``WanAttentionBlock``) starts at zero, so each block starts as its shortcut and the input signal
      reaches the latent and the output undiluted;
    * ``quant_conv`` is rescaled on the batch ``x`` so the posterior means have zero mean and unit
      variance per channel, and the log-variances start at -6 (posterior std 0.05): the decoder sees a
      strong signal, not noise.
    """
    for module in vae.modules():
        kind = type(module).__name__
        if kind == "WanResidualBlock":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif kind == "WanAttentionBlock":
            module.proj.weight.zero_()
            module.proj.bias.zero_()
    mean = vae.encode(x).latent_dist.mean.float()
    mu, sd = mean.mean(dim=(0, 2, 3, 4)), mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    c = vae.config.z_dim
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    weight[:c] /= sd.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype)
    bias[:c] = (bias[:c] - mu) / sd
    weight[c:] = 0.0
    bias[c:] = -6.0


def train_vae(vae, cfg: TrainConfig, device, amp: bool, log: TrainLog) -> dict:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    stream = SpecStream(cfg.seed * 2 + 0)
    sample, _ = render_batch(
        SpecStream(cfg.seed * 2 + 4), cfg.vae_batch, cfg.vae_frames, cfg.vae_crop, cfg.vae_crop, device
    )
    init_vae_for_training(vae, sample)
    budget, start, step, batch = cfg.vae_minutes * 60, time.time(), 0, cfg.vae_batch
    log.plan(budget, cfg.dit_minutes * 60)
    while step < cfg.vae_max_steps and time.time() - start < budget:
        lr = cfg.vae_lr * lr_factor(step, (time.time() - start) / budget, cfg.vae_warmup_steps, cfg.warmup_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            frames, crop = vae_clip_shape(step, cfg)
            # Scenes rendered at a random size from the crop size up to the full size, then cropped: small
            # renders keep the shape inside the crop, large ones show it at the scale the model generates.
            render = random.randint(crop, max(crop, min(cfg.height, cfg.width)))
            x, _ = render_batch(stream, batch, frames, render, render, device)
            top, left = (random.randint(0, render - crop) for _ in range(2))
            x = x[..., top : top + crop, left : left + crop]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                posterior = vae.encode(x).latent_dist
                rec = decode_unclamped(vae, posterior.sample())
            rec = rec.float()
            kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
            l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
            loss = l1 + mse + cfg.vae_kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            opt.step()
        except RuntimeError as err:
            batch = halved_batch_after_oom(err, batch, opt, "VAE")
            continue
        log.add("vae", step, loss, lr, l1=l1, kl=kl)
        step += 1
    log.flush()
    vae.eval()
    return dict(steps=step, batch=batch, seconds=round(time.time() - start, 1), videos=stream.index)


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, amp: bool, batch: int) -> torch.Tensor:
    """Raw VAE latents (posterior mode) of ``x`` [N, 3, F, H, W], in float32, ``batch`` videos at a time."""
    out = []
    for chunk in x.split(batch):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(vae.encode(chunk).latent_dist.mode().float())
    return torch.cat(out)


def set_latent_stats(vae, cfg: TrainConfig, device, amp: bool) -> None:
    """Per-channel mean / std of full-size latents into the VAE config (WanPipeline un-normalises with them)."""
    stream = SpecStream(cfg.seed * 2 + 1)
    latents = []
    for start in range(0, cfg.stats_videos, cfg.encode_batch):
        n = min(cfg.encode_batch, cfg.stats_videos - start)
        x, _ = render_batch(stream, n, cfg.frames, cfg.height, cfg.width, device)
        latents.append(encode_latents(vae, x, amp, cfg.encode_batch))
    z = torch.cat(latents).transpose(0, 1).flatten(1)  # [C, everything else]
    mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-4)
    vae.register_to_config(
        latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std]
    )


def normalised_latents(vae, z: torch.Tensor) -> torch.Tensor:
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, c, 1, 1, 1)
    return (z - mean) / std


# ----------------------------------------------------------------------------------------- transformer phase


class LatentBank:
    """A ring buffer of (normalised latent, token ids, attention mask) on the training device."""

    def __init__(self, size: int):
        self.size, self.filled, self.pos = size, 0, 0
        self.latents = self.ids = self.mask = None

    def add(self, latents: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if self.latents is None:
            shape = (self.size, *latents.shape[1:])
            self.latents = torch.empty(shape, dtype=torch.bfloat16, device=latents.device)
            self.ids = torch.empty((self.size, ids.shape[1]), dtype=ids.dtype, device=latents.device)
            self.mask = torch.empty_like(self.ids)
        n = latents.shape[0]
        idx = (self.pos + torch.arange(n, device=latents.device)) % self.size
        self.latents[idx] = latents.to(torch.bfloat16)
        self.ids[idx], self.mask[idx] = ids, mask
        self.pos = (self.pos + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def sample(self, n: int):
        idx = torch.randint(0, self.filled, (n,), device=self.latents.device)
        return self.latents[idx].float(), self.ids[idx], self.mask[idx]


def tokenize(tokenizer, prompts, device):
    t = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    return t.input_ids.to(device), t.attention_mask.to(device)


def text_embeddings(text_encoder, ids, mask):
    """As WanPipeline does it: the encoder's last hidden state, zero past each prompt's length."""
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def refresh_bank(bank, vae, tokenizer, stream, cfg, device, amp, n: int) -> None:
    x, prompts = render_batch(stream, n, cfg.frames, cfg.height, cfg.width, device)
    z = normalised_latents(vae, encode_latents(vae, x, amp, cfg.encode_batch))
    ids, mask = tokenize(tokenizer, prompts, device)
    bank.add(z, ids, mask)


@torch.no_grad()
def ema_update(ema_params, params, decay: float) -> None:
    torch._foreach_lerp_(ema_params, params, 1 - decay)


class DenoiserStep(torch.nn.Module):
    """Text encoder + transformer as one module (one forward, as DistributedDataParallel wants): the flow
    velocity predicted for noisy latents ``xt`` at noise levels ``sigma`` under prompts ``ids`` / ``mask``."""

    def __init__(self, transformer, text_encoder):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def forward(self, xt, sigma, ids, mask):
        emb = text_embeddings(self.text_encoder, ids, mask)
        return self.transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb,
                                return_dict=False)[0]


# With several ranks, the elapsed time that drives the learning rate and the end of the phase is agreed
# (the largest of the ranks') every this many steps, so every rank takes the same steps at the same rate.
_SYNC_EVERY = 10


def _agreed_elapsed(start: float, device, world: int) -> float:
    elapsed = time.time() - start
    if world > 1:
        t = torch.tensor([elapsed], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        elapsed = float(t.item())
    return elapsed


def train_transformer(components, cfg: TrainConfig, device, amp: bool, log: TrainLog, rank: int = 0,
                      world: int = 1) -> dict:
    """The transformer phase; with ``world`` > 1 ranks, data-parallel (DDP): each rank renders and encodes
    its own videos (its own spec stream) into its own latent bank, trains on ``dit_batch`` of them per
    step, and gradients are averaged, so one step sees ``world x dit_batch`` videos."""
    transformer, text_encoder = components["transformer"], components["text_encoder"]
    vae, tokenizer = components["vae"], components["tokenizer"]
    transformer.to(device).train()
    text_encoder.to(device).train()
    params = [p for m in (transformer, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    model = DenoiserStep(transformer, text_encoder)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    stream = SpecStream(cfg.seed * 2 + 2 + _RANK_STREAM_OFFSET * rank)
    bank = LatentBank(cfg.bank_size)
    empty_ids, empty_mask = tokenize(tokenizer, [""], device)
    start = time.time()
    while bank.filled < min(cfg.bank_size, 2 * cfg.dit_batch):  # a first fill, then a refresh every few steps
        refresh_bank(bank, vae, tokenizer, stream, cfg, device, amp, cfg.bank_refresh)
    if rank == 0:
        print(f"latent bank: {bank.filled} videos encoded in {time.time() - start:.1f}s", flush=True)
    budget, start, step, batch = cfg.dit_minutes * 60, time.time(), 0, cfg.dit_batch
    log.plan(budget, 0.0)
    elapsed = 0.0
    while True:
        if world == 1 or step % _SYNC_EVERY == 0:
            elapsed = _agreed_elapsed(start, device, world)
        if step >= cfg.dit_max_steps or elapsed >= budget:
            break
        lr = cfg.dit_lr * lr_factor(step, elapsed / budget, cfg.dit_warmup_steps, cfg.warmup_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            if step % cfg.bank_refresh_every == 0:
                refresh_bank(bank, vae, tokenizer, stream, cfg, device, amp, cfg.bank_refresh)
            x0, ids, mask = bank.sample(batch)
            drop = torch.rand(batch, device=device) < cfg.cfg_dropout
            ids = torch.where(drop[:, None], empty_ids, ids)
            mask = torch.where(drop[:, None], empty_mask, mask)
            u = torch.rand(batch, device=device)
            sigma = cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u)
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pred = model(xt, sigma, ids, mask)
            loss = F.mse_loss(pred.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        except RuntimeError as err:
            if world > 1 and is_oom(err):  # the other ranks are waiting in the all-reduce: no retry
                raise RuntimeError(f"rank {rank}: out of memory at --dit-batch {batch}; pass a smaller "
                                   "--dit-batch (it is per GPU)") from err
            batch = halved_batch_after_oom(err, batch, opt, "transformer")
            continue
        ema_update(ema, [p.detach().float() for p in params], min(cfg.ema_decay, (1 + step) / (10 + step)))
        log.add("transformer", step, loss, lr)
        step += 1
    log.flush()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e.to(p.dtype))
    transformer.eval()
    text_encoder.eval()
    return dict(steps=step, batch=batch, gpus=world, seconds=round(time.time() - start, 1),
                videos=stream.index * world)


# -------------------------------------------------------------------------------------------- samples


def frame_grid(rows, columns: int) -> np.ndarray:
    """uint8 [R*H, C*W, 3] of ``columns`` evenly spaced frames of each video in ``rows`` ([F, H, W, 3] uint8)."""
    out = []
    for video in rows:
        idx = np.linspace(0, len(video) - 1, columns).round().astype(int)
        out.append(np.concatenate([video[i] for i in idx], axis=1))
    return np.concatenate(out, axis=0)


def tile_videos(videos, columns: int) -> np.ndarray:
    """Equal-sized uint8 videos [F, H, W, 3] side by side, ``columns`` per row (black tiles fill the last row)."""
    rows = -(-len(videos) // columns)
    blank = np.zeros_like(videos[0])
    tiles = list(videos) + [blank] * (rows * columns - len(videos))
    return np.concatenate(
        [np.concatenate(tiles[r * columns : (r + 1) * columns], axis=2) for r in range(rows)], axis=1
    )


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def save_png(array: np.ndarray, path: pathlib.Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.partial")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def measure_prompt_following(pipe, cfg: TrainConfig, batch: int = 8) -> dict:
    """Generate ``cfg.judge_prompts`` held-out prompts (:func:`dit_sparse.data.held_out_specs`, seed i, the
    sample steps and guidance) and judge each video from its pixels (:func:`dit_sparse.data.judge_video`):
    the share judged right per attribute and for all four, as ``scripts/prompt_following.py`` reports it."""
    specs = held_out_specs(cfg.judge_prompts)
    pipe.set_progress_bar_config(disable=True)
    verdicts = []
    for start in range(0, len(specs), batch):
        chunk = specs[start:start + batch]
        frames = pipe(
            [s.prompt for s in chunk], num_frames=cfg.frames, height=cfg.height, width=cfg.width,
            num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, output_type="np",
            generator=[torch.Generator("cpu").manual_seed(start + j) for j in range(len(chunk))],
        ).frames
        verdicts += [judge_video(np.clip(np.asarray(v, dtype=np.float32), 0, 1), s) for v, s in zip(frames, chunk)]
    return accuracy(verdicts)


def prompt_following_line(cfg: TrainConfig, result: dict | str | None) -> list[str]:
    """The README line of :func:`measure_prompt_following`'s result (or of why there is none)."""
    if result is None:
        return []
    head = (f"- prompt following ({cfg.judge_prompts} held-out prompts `sample_spec({HELD_OUT_SPEC_SEED}, i)`, "
            f"{cfg.sample_steps} steps, guidance {cfg.guidance_scale}, judged from the pixels by "
            "`dit_sparse.data.judge`; chance 11% / 11% / 11% / 20%): ")
    if isinstance(result, str):
        return [head + f"not measured ({result})"]
    return [head + f"shape colour {100 * result['color']:.1f}%, background {100 * result['background']:.1f}%, "
            f"motion {100 * result['motion']:.1f}%, shape {100 * result['shape']:.1f}%, "
            f"all four {100 * result['all_correct']:.1f}%"]


def write_samples(model_dir: pathlib.Path, samples_dir: pathlib.Path, cfg: TrainConfig, device) -> list:
    """Reload the saved folder, generate a video per sample prompt; write them tiled into one
    ``samples.mp4``, a PNG grid of their frames, the prompts, and a PNG of VAE reconstructions (four files)."""
    from diffusers import WanPipeline

    from dit_sparse.pipelines._dtype import dtype_kwargs
    from dit_sparse.pipelines.video import write_video

    samples_dir.mkdir(parents=True, exist_ok=True)
    pipe = WanPipeline.from_pretrained(str(model_dir), local_files_only=True, **dtype_kwargs(torch.float32)).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(SAMPLE_PROMPTS[: cfg.sample_prompts])
    videos = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
        frames = pipe(
            prompt, num_frames=cfg.frames, height=cfg.height, width=cfg.width, num_inference_steps=cfg.sample_steps,
            guidance_scale=cfg.guidance_scale, generator=generator, output_type="np",
        ).frames[0]
        videos.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
    try:
        write_video(tile_videos(videos, columns=2), samples_dir / "samples.mp4", fps=DEFAULT_FPS)
    except (ImportError, OSError, RuntimeError) as err:  # no ffmpeg here: the PNG grid still shows them
        print(f"could not write samples.mp4 ({err}); see samples_grid.png", flush=True)
    save_png(frame_grid(videos, 5), samples_dir / "samples_grid.png")
    lines = [f"row {i // 2 + 1}, column {i % 2 + 1} of samples.mp4 / row {i + 1} of samples_grid.png: {p}\n"
             for i, p in enumerate(prompts)]
    (samples_dir / "prompts.txt").write_text("".join(lines))
    # VAE reconstructions: originals on even rows, reconstructions below them.
    x, _ = render_batch(SpecStream(cfg.seed * 2 + 3), 3, cfg.frames, cfg.height, cfg.width, device)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    pairs = [v for a, b in zip(x, rec) for v in (_to_uint8_frames(a), _to_uint8_frames(b))]
    save_png(frame_grid(pairs, 5), samples_dir / "vae_reconstruction_grid.png")
    return prompts


def write_archive(folder: pathlib.Path, archive: pathlib.Path, part_mib: float) -> list:
    """Tar ``folder`` into parts ``<archive>.00``, ``<archive>.01``, ... of at most ``part_mib`` MiB each (for
    machines that hand back only a few small files). Reassemble with ``cat <archive>.* | tar -x``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # uncompressed: fp16 weights hardly compress
        tar.add(str(folder), arcname=folder.name)
    data, size = buffer.getvalue(), max(1, int(part_mib * 2**20))
    archive.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(data), size)):
        part = archive.with_name(f"{archive.name}.{i:02d}")
        tmp = part.with_name(f".{part.name}.partial")
        tmp.write_bytes(data[start : start + size])
        tmp.replace(part)
        parts.append(part)
    return parts


# ----------------------------------------------------------------------------------------------- main


def load_for_resume(folder: pathlib.Path) -> tuple[dict, str]:
    """Components of a model folder written by this script, in fp32 for training, and its README (the
    record of the earlier runs, kept in the new README)."""
    from diffusers import WanPipeline

    folder = pathlib.Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "README.md").is_file():
        raise ValueError(f"--resume-from {folder}: not a model folder written by this script "
                         "(needs model_index.json and README.md)")
    pipe = WanPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    components = {k: v for k, v in pipe.components.items() if k in
                  ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
    return components, (folder / "README.md").read_text()


def resumed_seed(folder: pathlib.Path) -> int:
    """Seed of a run resumed from ``folder`` without ``--seed``: one more than the seed of the run that wrote
    it (the ``seed`` of its README's Configuration block; 0 when the README records none). The data stream,
    noise and noise levels all follow the seed, so a resumed run with the seed of the last one replays the
    videos that run saw, in the same order with the same noise. (The default model's chain ran seed 0 eight
    times, motion judged right 17-29% over the last four; the next two runs, seeds 11 and 12, took it to 58%
    and 75% - more training too, so not a controlled comparison.)"""
    readme = pathlib.Path(folder) / "README.md"
    if not readme.is_file():
        raise ValueError(f"--resume-from {folder}: not a model folder written by this script "
                         "(needs model_index.json and README.md)")
    match = re.search(r"^## Configuration\s*```json\s*(\{.*?\})\s*```", readme.read_text(), re.S | re.M)
    earlier = json.loads(match.group(1)).get("seed", 0) if match else 0
    return int(earlier) + 1


def _earlier_runs(readme: str) -> list[str]:
    """The training-run sections of an earlier README, demoted one heading level."""
    out, keep = [], False
    for line in readme.splitlines():
        if line.startswith("## "):
            keep = line.startswith("## Training run") or line.startswith("## Earlier")
        if keep:
            out.append("#" + line if line.startswith("#") else line)
    return out


def readme_text(cfg, args, vae_stats, dit_stats, log, device, sizes, started, earlier=None, following=None) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    import diffusers
    import transformers

    lines = [
        "# dit-sparse embedded default model",
        "",
        "A tiny text-to-video model of Wan architecture (`diffusers.WanPipeline`), trained by",
        "`scripts/train_default_model.py` on the procedural video set of `dit_sparse.data.procedural`:",
        "one coloured shape (circle, square, triangle, diamond, ring) moving left / right / up / down,",
        "bouncing, growing, shrinking or turning another colour, on a plain or striped / checkered / dotted",
        "background. Prompts read `a red circle moving left on a blue background`.",
        f"Default size: {DEFAULT_FRAMES} frames of {DEFAULT_HEIGHT}x{DEFAULT_WIDTH} "
        "(latent 9x32x32, 2304 video tokens).",
        "",
        "## Training run",
        "",
        f"- date: {started} (UTC)",
        f"- device: {gpu}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
        f"- command: `{' '.join(args)}`",
        (f"- VAE: {vae_stats['steps']} steps in {vae_stats['seconds']} s, batch {vae_stats['batch']} x "
         f"{cfg.vae_frames} frames at {cfg.vae_crop}x{cfg.vae_crop} crops"
         + (f" (one step in {cfg.vae_short_every}: {cfg.vae_short_frames} frames at "
            f"{cfg.vae_short_crop}x{cfg.vae_short_crop})" if cfg.vae_short_every else "")
         + f", {vae_stats['videos']} videos rendered; "
         f"final loss (L1 + MSE + KL term, mean of last 50 steps) {log.final_loss('vae'):.5f}")
        if vae_stats is not None else
        "- VAE: kept from the run this one resumed (see Earlier runs below); no VAE steps in this run",
        f"- transformer + text encoder: {dit_stats['steps']} steps in {dit_stats['seconds']} s, batch "
        f"{dit_stats['batch']}" + (f" per GPU x {dit_stats['gpus']} GPUs (data-parallel)"
                                   if dit_stats.get("gpus", 1) > 1 else "")
        + f", {dit_stats['videos']} videos of {cfg.frames}x{cfg.height}x{cfg.width}; "
        f"final flow-matching loss (mean of last 50 steps) {log.final_loss('transformer'):.5f}",
        *prompt_following_line(cfg, following),
        f"- parameters: {sizes}",
        "- weights: transformer and VAE stored in fp16 (their float32-kept modules in fp32), text encoder in fp32",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(asdict(cfg), indent=2),
        "```",
        "",
        "`train_log.csv` holds the loss of every step of this run.",
        "",
    ]
    if earlier is not None:
        lines += ["## Earlier runs (this run resumed from their weights)", ""] + _earlier_runs(earlier) + [""]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = pathlib.Path(__file__).resolve().parents[1]
    p.add_argument("--out", type=pathlib.Path, default=root / "pipelines" / "default_model", help="model folder")
    p.add_argument("--samples-dir", type=pathlib.Path, default=root / "out" / "default_model_samples")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the data, noise and noise levels (default 0; with --resume-from, one more than the "
                        "resumed run's seed, so a chain of runs keeps drawing new videos)")
    p.add_argument("--vae-minutes", type=float, default=None)
    p.add_argument("--dit-minutes", type=float, default=None)
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--dit-batch", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 autocast on cuda only")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps on the CPU (checks the whole path)")
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--archive", type=pathlib.Path, default=None,
                   help="also write the model folder as a tar split into ARCHIVE.00, ARCHIVE.01, ...")
    p.add_argument("--archive-part-mib", type=float, default=15.0, help="largest archive part (MiB)")
    p.add_argument("--resume-from", type=pathlib.Path, default=None,
                   help="a model folder written by this script: keep its VAE (and latent statistics) and train "
                        "its transformer + text encoder further for --dit-minutes (no VAE phase)")
    p.add_argument("--dit-lr", type=float, default=None, help="peak transformer learning rate")
    p.add_argument("--flow-shift", type=float, default=None,
                   help=f"shift of the training noise levels, s = shift u / (1 + (shift - 1) u) (default "
                        f"{TRAIN_FLOW_SHIFT}: uniform; the sampler's {SCHEDULER_CONFIG['flow_shift']} trains low "
                        "noise, where outlines form, too rarely); the saved sampler keeps its own shift")
    p.add_argument("--gpus", type=int, default=1,
                   help="train the transformer data-parallel on this many GPUs (one process each; gloo processes "
                        "on a CPU); needs --resume-from (the VAE phase runs on one GPU); --dit-batch is per GPU")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpus > 1:
        if args.resume_from is None:
            raise ValueError(f"--gpus {args.gpus} trains the transformer data-parallel and keeps a trained VAE: pass "
                             "--resume-from a model folder (train the VAE and a first transformer with one GPU)")
        from dit_sparse import parallel

        parallel.launch(_rank_main, args.gpus, list(argv))
        return 0
    return run(argv)


def _rank_main(rank: int, world: int, argv: list) -> None:
    """One process of ``--gpus N`` (``dit_sparse.parallel.launch``): the transformer phase on GPU ``rank``;
    rank 0 then saves, archives and writes the samples."""
    run(argv, rank, world)


def run(argv, rank: int = 0, world: int = 1) -> int:
    t_start = time.time()
    args = parse_args(argv)
    if args.seed is None:
        args.seed = resumed_seed(args.resume_from) if args.resume_from is not None else 0
        argv = [*argv, "--seed", str(args.seed)]  # the command recorded in the README repeats this run
    cfg = smoke_config(args.seed) if args.smoke else TrainConfig(seed=args.seed)
    for name in ("vae_minutes", "dit_minutes", "vae_batch", "dit_batch", "dit_lr", "flow_shift"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    check_config(cfg)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation (and fight on busy CPUs)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)  # rank 0 as a one-GPU run; DDP copies rank 0's weights to the others
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if rank == 0:
        print(f"device {device} x {world}, bf16 autocast {amp}, config {asdict(cfg)}", flush=True)

    if args.resume_from is not None:
        components, earlier = load_for_resume(args.resume_from)
    else:
        components, earlier = build_default_components(seed=cfg.seed), None
    sizes = {
        k: f"{sum(p.numel() for p in components[k].parameters()) / 1e6:.2f}M"
        for k in ("transformer", "vae", "text_encoder")
    }
    log = TrainLog(every=1 if args.smoke else 50, quiet=rank > 0)
    if earlier is None:
        vae_stats = train_vae(components["vae"], cfg, device, amp, log)
        components["vae"].requires_grad_(False)
        set_latent_stats(components["vae"], cfg, device, amp)
    else:
        vae_stats = None  # the resumed VAE and its latent statistics stay as they are
        components["vae"].to(device).eval().requires_grad_(False)
    dit_stats = train_transformer(components, cfg, device, amp, log, rank, world)
    if rank > 0:  # every rank holds the same weights now; rank 0 writes them
        return 0

    from diffusers import WanPipeline

    for name in ("transformer", "vae", "text_encoder"):
        components[name].to(device)
    pipe = WanPipeline(**components)
    following = None
    if cfg.judge_prompts > 0:
        try:
            following = measure_prompt_following(pipe, cfg)
        except (RuntimeError, ValueError) as err:  # the weights are what matters: save them whatever happens here
            following = f"{type(err).__name__}: {err}"
            print(f"prompt following not measured: {following}", flush=True)
        else:
            print("prompt following: " + prompt_following_line(cfg, following)[0].split("): ", 1)[1], flush=True)
    pipe.to("cpu")
    command = ["python", "scripts/train_default_model.py", *argv]
    readme = readme_text(cfg, command, vae_stats, dit_stats, log, device, sizes, started, earlier, following)
    out = save_default_model(pipe, args.out, extra_files={"README.md": readme, "train_log.csv": log.csv_text()})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.1f} MB)", flush=True)
    if args.archive is not None:
        parts = write_archive(out, args.archive, args.archive_part_mib)
        print(f"wrote {len(parts)} archive parts {args.archive}.NN; unpack: cat {args.archive}.* | tar -x", flush=True)
    if not args.no_samples:
        prompts = write_samples(out, args.samples_dir, cfg, device)
        print(f"wrote {len(prompts)} sample videos and grids to {args.samples_dir}", flush=True)
    print(f"total {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
