"""HunyuanVideo under diffusers' Ulysses context parallelism (dit_sparse/parallel.py), on CPU with gloo.

HunyuanVideo's attention is joint (video tokens, then text tokens with a padding key mask), so after
Ulysses' all-to-all the rank shards interleave; dit-sparse's cp plan (``HUNYUAN_VIDEO_CP_PLAN``) and
per-rank reordering must give exactly the single-process result. One spawn of 2 processes runs every
distributed case on the tiny HunyuanVideo model (2 heads, one per rank; 1 dual + 1 single-stream block;
192 video + 12 text tokens of which the last 5 are padding, so rank 1's text shard is mostly masked):

* stock (dense diffusers) attention under CP equals stock single-process;
* our path with every block kept (``pattern="dense"``) under CP equals stock single-process;
* a sparse config under CP equals the same config in one process (``enable_ulysses`` before and after
  ``apply_sparse_attention``), and the ``fast`` preset (block reuse) step by step;
* gradients through the sparse path (the per-rank backward, reordering included) equal one process;
* a size the equal split cannot take, ring attention and a plan without the mask hook raise clear errors.

``ulysses_anything`` (uneven shards) is not run here: diffusers gathers uneven shards with an
``all_gather`` of unequal tensors, which gloo cannot do; its reordering is checked without processes.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from dit_sparse import parallel
from dit_sparse.config import SparseAttentionConfig

sys.path.insert(0, os.path.dirname(__file__))
from _ulysses_harness import (  # noqa: E402
    assert_close, enable_diffusers_cp, raised_message, ring_refusals, run_ranks_and_single, save_rank_result,
)

WORLD = 2
STEPS = (900.0, 700.0, 500.0, 300.0)
SPARSE = dict(pattern="tile3d+topk", window=(1, 1, 1), topk_ratio=0.25, block_size=64, dense_steps=0)
DENSE_PATH = dict(pattern="dense", block_size=64, dense_steps=0)


def _fast_config():
    from dit_sparse.presets import preset_config

    # the tiny model has 2 blocks: keep only block 0 (it carries the text split) always computed
    return preset_config("fast", block_size=64, always_compute_blocks=(0,))


def _with_inputs(case, latent=None, text_len=None, valid=None):
    """The case with other latent / text sizes; ``valid`` text tokens (a padded prompt)."""
    base = case.make_inputs

    def inputs(t):
        x = base(t)
        if latent is not None:
            x["hidden_states"] = torch.randn(*latent, generator=torch.Generator().manual_seed(5))
        if text_len is not None:
            x["encoder_hidden_states"] = torch.randn(1, text_len, 32, generator=torch.Generator().manual_seed(6))
            mask = torch.zeros(1, text_len, dtype=torch.bool)
            mask[:, : (text_len if valid is None else valid)] = True
            x["encoder_attention_mask"] = mask
        return x

    case.make_inputs = inputs
    return case


def _uneven(case):
    # 3 x 9 x 9 = 243 video tokens and 13 text tokens (9 valid): neither splits evenly over 2 ranks
    return _with_inputs(case, latent=(1, 4, 3, 18, 18), text_len=13, valid=9)


def _run_steps(case, steps):
    with torch.no_grad():
        return [case.model(**case.make_inputs(t), return_dict=False)[0] for t in steps]


def _latent_grad(case, rank_world):
    """Output and gradient of a weighted output sum w.r.t. the latent (summed over the ranks: each rank's
    backward reaches only its own video tokens)."""
    x = case.make_inputs(500.0)
    latent = x["hidden_states"].clone().requires_grad_(True)
    x["hidden_states"] = latent
    out = case.model(**x, return_dict=False)[0]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grad = latent.grad.clone()
    if rank_world:
        torch.distributed.all_reduce(grad)
    return out.detach(), grad


def _cases(rank_world=None):
    """Every case as name -> outputs; under ``rank_world`` the model runs under Ulysses CP."""
    from _tiny_models import tiny_hunyuan_video

    from dit_sparse.apply import apply_sparse_attention

    def model(parallel_first=True, config=None, num_steps=None, adapt=None):
        case = tiny_hunyuan_video()
        if adapt is not None:
            case = adapt(case)
        if rank_world and parallel_first:
            parallel.enable_ulysses(case.model, rank_world[1])
        if config is not None:
            apply_sparse_attention(case.model, config, num_steps=num_steps)
        if rank_world and not parallel_first:
            parallel.enable_ulysses(case.model, rank_world[1])
        return case

    out = {}
    out["stock"] = model().run()
    c = model(config=SparseAttentionConfig(**DENSE_PATH))
    out["dense_path"] = c.run()
    out["dense_path_calls"] = c.model.sparse_attention_stats()["calls"]
    c = model(config=SparseAttentionConfig(**SPARSE))
    out["sparse"] = c.run()
    stats = c.model.sparse_attention_stats()
    out["sparse_density"] = stats["density"]
    out["sparse_calls"] = stats["calls"]
    if rank_world:
        out["sparse_apply_first"] = model(parallel_first=False, config=SparseAttentionConfig(**SPARSE)).run()
    out["sparse_grad"] = _latent_grad(model(config=SparseAttentionConfig(**SPARSE)), rank_world)
    c = model(config=_fast_config(), num_steps=len(STEPS))
    out["fast"] = _run_steps(c, STEPS)
    out["fast_reuse"] = c.model.sparse_attention_stats()["block_reuse"]
    if not rank_world:
        out["unpadded_stock"] = model(adapt=lambda c: _with_inputs(c, text_len=12)).run()
    return out


def _errors(rank, world):
    """The messages of the refusals: an uneven size without ulysses_anything, ring attention (at apply
    and at the first call), and a model parallelised with the plan alone (no mask hook)."""
    from _tiny_models import tiny_hunyuan_video

    from dit_sparse.apply import apply_sparse_attention

    case = _uneven(tiny_hunyuan_video())
    parallel.enable_ulysses(case.model, world)
    msgs = {"uneven": raised_message(case.run)}
    msgs["ring"] = ring_refusals(tiny_hunyuan_video, world, SparseAttentionConfig(**SPARSE),
                                 parallel.HUNYUAN_VIDEO_CP_PLAN)
    case = tiny_hunyuan_video()
    apply_sparse_attention(case.model, SparseAttentionConfig(**SPARSE))
    enable_diffusers_cp(case.model, parallel.HUNYUAN_VIDEO_CP_PLAN, ulysses_degree=world)
    msgs["no_mask_hook"] = raised_message(case.run)
    return msgs


def _worker(rank, world, out_dir):
    torch.set_num_threads(1)
    results = _cases((rank, world))
    results["errors"] = _errors(rank, world)
    save_rank_result(results, out_dir, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The single-process references are computed while the spawned ranks start up (imports dominate).
    return run_ranks_and_single(_worker, WORLD, str(tmp_path_factory.mktemp("ulysses_hunyuan")), _cases)


_close = assert_close


# ---------------------------------------------------------------------------------------------- distributed
def test_text_padding_matters(runs):
    _, single = runs
    # the padded prompt changes the output: a test that ignored the mask could not pass
    assert (single["stock"] - single["unpadded_stock"]).abs().max() > 1e-3


def test_stock_under_cp_equals_single_process(runs):
    ranks, single = runs
    for r in ranks:
        _close(r["stock"], single["stock"])


def test_dense_path_under_cp_equals_stock(runs):
    ranks, single = runs
    for r in ranks:
        assert r["dense_path_calls"]["sparse"] > 0 and not r["dense_path_calls"]["passthrough"]
        _close(r["dense_path"], single["stock"])


def test_sparse_under_cp_equals_single_process(runs):
    ranks, single = runs
    assert single["sparse_density"] < 0.9  # the config is really sparse
    assert (single["sparse"] - single["stock"]).abs().max() > 1e-3
    for r in ranks:
        assert r["sparse_calls"] == single["sparse_calls"]
        assert r["sparse_calls"]["sparse"] > 0 and not r["sparse_calls"]["passthrough"]
        _close(r["sparse"], single["sparse"])
        _close(r["sparse_apply_first"], single["sparse"])


def test_sparse_gradients_under_cp_equal_single_process(runs):
    ranks, single = runs
    want_out, want_grad = single["sparse_grad"]
    assert want_grad.abs().max() > 1e-3
    for r in ranks:
        got_out, got_grad = r["sparse_grad"]
        _close(got_out, want_out)
        _close(got_grad, want_grad)


def test_block_reuse_under_cp_equals_single_process_step_by_step(runs):
    ranks, single = runs
    assert single["fast_reuse"]["blocks"]["reused"] > 0
    for r in ranks:
        assert r["fast_reuse"]["blocks"] == single["fast_reuse"]["blocks"]
        for got, want in zip(r["fast"], single["fast"]):
            _close(got, want)


def test_refusals_under_cp(runs):
    ranks, _ = runs
    for r in ranks:
        errors = r["errors"]
        assert "divisible by 2" in errors["uneven"] and "243 video tokens (3x9x9" in errors["uneven"]
        assert "13 text tokens" in errors["uneven"] and "ulysses_anything" in errors["uneven"]
        assert len(errors["ring"]) == 2
        for msg in errors["ring"]:
            assert "ring context parallelism" in msg and "ulysses_degree" in msg
        assert "enable_ulysses" in errors["no_mask_hook"]


# ---------------------------------------------------------------------------------------------- no processes
def test_hunyuan_video_is_no_longer_refused_but_sla_and_other_joint_families_are():
    parallel.check_supported("hunyuan_video", SparseAttentionConfig())
    assert "hunyuan_video" in parallel.ULYSSES_FAMILIES
    with pytest.raises(ValueError, match="mode='sla'"):
        parallel.check_supported("hunyuan_video", types.SimpleNamespace(mode="sla", reuse_scope="step"))
    with pytest.raises(ValueError, match="block 0"):
        parallel.check_supported(
            "hunyuan_video", SparseAttentionConfig(reuse_scope="block", reuse_every=2, always_compute_blocks=(-1,))
        )


def test_cp_plan_for_hunyuan_video():
    from _tiny_models import tiny_hunyuan_video

    model = tiny_hunyuan_video().model
    plan = parallel.cp_plan_for(model)
    assert plan is parallel.HUNYUAN_VIDEO_CP_PLAN
    assert set(plan) == {"x_embedder", "rope", "transformer_blocks.0", "proj_out"}
    assert "encoder_hidden_states" in plan["transformer_blocks.0"]
    model.transformer_blocks = torch.nn.ModuleList()  # no dual-stream blocks: the single ones split the text
    assert "single_transformer_blocks.0" in parallel.cp_plan_for(model)


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("uneven", [False, True])
def test_joint_order_round_trip(text_first, uneven):
    video, text, count = (12, 6, 3) if not uneven else (13, 5, 3)
    order = parallel._joint_order(video, text, count, uneven, text_first, torch.device("cpu"))
    # the gathered sequence the all-to-all produces: per rank its local [video_r, text_r]
    vids = torch.arange(video).tensor_split(count) if uneven else torch.arange(video).chunk(count)
    txts = (torch.arange(text) + 1000).tensor_split(count) if uneven else (torch.arange(text) + 1000).chunk(count)
    gathered = torch.cat([torch.cat((t, v) if text_first else (v, t)) for v, t in zip(vids, txts)])
    canonical = gathered[order.canonical]
    want = torch.cat((torch.arange(text) + 1000, torch.arange(video)) if text_first
                     else (torch.arange(video), torch.arange(text) + 1000))
    assert torch.equal(canonical, want)
    assert torch.equal(canonical[order.gathered], gathered)


def test_joint_order_rejects_uneven_without_anything():
    with pytest.raises(ValueError, match="divisible by 2"):
        parallel._joint_order(13, 6, 2, False, False, torch.device("cpu"))
