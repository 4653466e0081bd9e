"""Training batches: samples from the procedural set or a video folder, encoded once and reused.

:func:`open_source` opens ``config.data`` (``"procedural"`` or a folder of ``.mp4`` with captions, both
from :mod:`dit_sparse.data`) as a sequence of ``(video [3, F, H, W] float in [-1, 1], prompt)`` samples.
:class:`EncodedBatches` picks the samples of optimizer step ``s`` deterministically from the seed and
``s`` alone (a seeded permutation per epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and keeps recent encodings (latents by sample, text states by
prompt) in a bounded cache because the VAE and the text encoder are frozen.
"""

from __future__ import annotations

import collections
import pathlib

import torch

from .encode import encode_prompts, encode_videos

__all__ = ["open_source", "EncodedBatches", "batch_indices"]

CACHE_ENTRIES = 256


def open_source(config):
    """The samples of ``config.data``: ``len()`` and ``[i] -> (video [3, F, H, W] in [-1, 1], prompt)``.

    Raises ``ValueError`` for a data folder that does not exist, holds no ``.mp4`` or lacks captions.
    """
    if config.data == "procedural":
        from ..data import ProceduralVideoDataset

        dataset = ProceduralVideoDataset(
            length=config.num_samples, seed=config.seed, frames=config.num_frames, height=config.height,
            width=config.width,
        )
        return _ModelInputs(dataset)
    folder = pathlib.Path(config.data)
    if not folder.is_dir():
        raise ValueError(
            f"data folder {folder} does not exist; pass a folder of .mp4 videos with captions, or 'procedural'"
        )
    from ..data import VideoFolderDataset

    dataset = VideoFolderDataset(folder, frames=config.num_frames, height=config.height, width=config.width)
    return _ModelInputs(dataset)


class _ModelInputs:
    """A data set of ``(video uint8 [F, H, W, 3], prompt)`` seen as ``(float [3, F, H, W] in [-1, 1], prompt)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from ..data import video_to_model_input

        video, prompt = self.dataset[i]
        return video_to_model_input(video)[0], str(prompt)


def batch_indices(step: int, batch_size: int, num_samples: int, seed: int) -> list[int]:
    """Sample indices of optimizer step ``step``: consecutive slices of a seeded permutation per epoch."""
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


class EncodedBatches:
    """``get(step) -> (latents [B, C, F', H', W'], prompt_embeds [B, L, D])`` on ``device``, float32.

    Latents are cached by sample index and text states by prompt, each for the most recent
    ``max(CACHE_ENTRIES, 2 * batch_size)`` entries.
    """

    def __init__(self, pipe, source, config, device):
        self.pipe, self.source, self.device = pipe, source, torch.device(device)
        self.batch_size, self.seed = config.batch_size, config.seed
        self.max_sequence_length = config.max_sequence_length
        self.capacity = max(CACHE_ENTRIES, 2 * config.batch_size)
        self._latents: collections.OrderedDict = collections.OrderedDict()  # index -> (latent, prompt)
        self._embeds: collections.OrderedDict = collections.OrderedDict()  # prompt -> text states

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch_indices(step, self.batch_size, len(self.source), self.seed)
        new = sorted({i for i in idx if i not in self._latents})
        if new:
            samples = [self.source[i] for i in new]
            latents = encode_videos(self.pipe.vae, torch.stack([v for v, _ in samples]).to(self.device))
            for i, (_, prompt), z in zip(new, samples, latents):
                self._put(self._latents, i, (z, prompt))
        pairs = [self._latents[i] for i in idx]
        prompts = sorted({p for _, p in pairs if p not in self._embeds})
        if prompts:
            embeds = encode_prompts(self.pipe, prompts, self.max_sequence_length, self.device)
            for p, e in zip(prompts, embeds):
                self._put(self._embeds, p, e)
        latents = torch.stack([z for z, _ in pairs])
        embeds = torch.stack([self._embeds[p] for _, p in pairs])
        return latents, embeds

    def _put(self, cache: collections.OrderedDict, key, value) -> None:
        cache[key] = value
        while len(cache) > self.capacity:
            cache.popitem(last=False)
