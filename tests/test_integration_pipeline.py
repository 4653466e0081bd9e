"""A full tiny ``WanPipeline`` run with dit-sparse (CPU, everything built offline).

Word-level tokenizer, one-layer UMT5 text encoder, a tiny AutoencoderKLWan and the tiny Wan transformer
of ``_tiny_models``; 4 steps with CFG and ``dense_steps=2``: steps 0-1 are dense, 2-3 sparse, the layout
built on step 2 is served from the cache on step 3, and the hook starts over for a second call. A
second test runs block-level step caching through the pipeline (its cond / uncond forwards and cache
context).
"""

from __future__ import annotations

import pytest
import torch

from _tiny_models import tiny_wan
from dit_sparse.apply import apply_sparse_attention, remove_sparse_attention
from dit_sparse.config import SparseAttentionConfig

WORDS = ["a", "cat", "dog", "runs", "on", "the", "beach", "bad", "blurry", "video"]


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=16, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    return WanPipeline(
        tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_wan().model,
    )


def _generate(pipe, snapshots):
    engine = pipe.transformer._dit_sparse_application.engine

    def on_step_end(p, i, t, kwargs):
        snapshots.append((i, dict(engine.counts), engine.cache.stats()))
        return {}

    return pipe(
        prompt="a cat runs on the beach", negative_prompt="bad blurry video", num_frames=13, height=128, width=128,
        num_inference_steps=4, guidance_scale=5.0, max_sequence_length=8, output_type="np",
        generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end,
    ).frames[0]


def test_wan_pipeline_dense_then_sparse_with_cache_hits(pipe):
    cfg = SparseAttentionConfig(pattern="tile3d", window=(1, 1, 1), tile=(1, 4, 4), block_size=64, dense_steps=2)
    apply_sparse_attention(pipe, cfg)
    try:
        first, second = [], []
        video = _generate(pipe, first)
        _generate(pipe, second)
        stats = pipe.transformer.sparse_attention_stats()
    finally:
        remove_sparse_attention(pipe)
    assert video.shape == (13, 128, 128, 3) and bool((video >= 0).all() and (video <= 1).all())
    calls = 2 * 2  # 2 layers x (cond + uncond)
    # steps 0-1 of both generations: stock dense; the hook started over for the second call
    assert [s[1].get("dense", 0) for s in first] == [calls, 2 * calls, 2 * calls, 2 * calls]
    assert [s[1].get("dense", 0) for s in second] == [3 * calls, 4 * calls, 4 * calls, 4 * calls]
    # first generation: steps 0-1 dense, 2-3 sparse
    assert [s[1].get("sparse", 0) for s in first] == [0, 0, calls, 2 * calls]
    # tile3d is static: one layout per CFG branch serves both layers; built on step 2, hits afterwards
    branches = 2
    assert (first[2][2]["misses"], first[2][2]["hits"]) == (branches, calls - branches)
    assert (first[3][2]["misses"], first[3][2]["hits"]) == (branches, 2 * calls - branches)
    # second generation: sparse again from step 2, layouts served from the cache
    assert [s[1].get("sparse", 0) for s in second] == [2 * calls, 2 * calls, 3 * calls, 4 * calls]
    assert second[3][2]["misses"] == branches and second[3][2]["hits"] == 4 * calls - branches
    assert stats["steps"] == 4 and stats["generations"] == 2 and stats["transformer_calls"] == 16


def test_wan_pipeline_block_reuse(pipe):
    """dense_steps=1, reuse_every=2: step 0 dense, 1 and 3 compute, 2 skips both blocks of both branches."""
    cfg = SparseAttentionConfig(pattern="tile3d", window=(1, 1, 1), tile=(1, 4, 4), block_size=64, dense_steps=1,
                                reuse_scope="block", reuse_every=2, always_compute_blocks=())
    apply_sparse_attention(pipe, cfg)
    try:
        snapshots = []
        video = _generate(pipe, snapshots)
        stats = pipe.transformer.sparse_attention_stats()
    finally:
        remove_sparse_attention(pipe)
    assert video.shape == (13, 128, 128, 3) and bool((video >= 0).all() and (video <= 1).all())
    calls = 2 * 2  # 2 blocks x (cond + uncond)
    assert stats["block_reuse"]["blocks"] == {"computed": 3 * calls, "reused": calls, "fallback": 0}
    assert stats["block_reuse"]["steps"] == {"computed": 3, "reused": 1}
    # no attention runs on the reuse step: sparse attention on steps 1 and 3 only
    assert [s[1].get("sparse", 0) for s in snapshots] == [0, calls, calls, 2 * calls]
    assert stats["block_reuse"]["kept"] == 0  # the pipeline's end-of-call reset dropped the residuals
