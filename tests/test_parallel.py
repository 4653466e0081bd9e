"""dit-sparse under diffusers' Ulysses context parallelism (dit_sparse/parallel.py), on CPU with gloo.

One spawn of 2 processes (``parallel.launch``) runs every distributed case on the tiny Wan model (2 heads,
one per rank; 256 tokens) and saves its outputs; the tests compare them with single-process runs:

* stock attention under CP equals stock single-process (the harness itself is faithful);
* our path with every block kept (``pattern="dense"``) under CP equals stock single-process;
* a sparse config (3D tiles + per-head top-k) under CP equals the same config in one process, with
  ``enable_parallelism`` before and after ``apply_sparse_attention``;
* the ``fast`` preset (block reuse) over several steps under CP equals one process, step by step;
* ring attention raises the clear ValueError, at apply and at the first call.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import parallel
from dit_sparse.config import SparseAttentionConfig

sys.path.insert(0, os.path.dirname(__file__))
from _ulysses_harness import assert_close, ring_refusals, run_ranks_and_single, save_rank_result  # noqa: E402

WORLD = 2
STEPS = (900.0, 700.0, 500.0, 300.0)  # fast preset: dense warm-up, then compute / reuse alternating
SPARSE = dict(pattern="tile3d+topk", window=(1, 1, 1), topk_ratio=0.25, block_size=64, dense_steps=0)
DENSE_PATH = dict(pattern="dense", block_size=64, dense_steps=0)


def _fast_config():
    from dit_sparse.presets import preset_config

    # the tiny model has 2 blocks: keep only block 0 (it carries diffusers' split) always computed
    return preset_config("fast", block_size=64, always_compute_blocks=(0,))


def _run_steps(model, make_inputs, steps):
    with torch.no_grad():
        return [model(**make_inputs(t), return_dict=False)[0] for t in steps]


def _cases(rank_world=None):
    """Every case as name -> outputs; under ``rank_world`` the model runs under Ulysses CP."""
    from _tiny_models import tiny_wan

    from dit_sparse.apply import apply_sparse_attention

    def model(parallel_first=True, config=None, num_steps=None):
        case = tiny_wan()
        if rank_world and parallel_first:
            parallel.enable_ulysses(case.model, rank_world[1])
        if config is not None:
            apply_sparse_attention(case.model, config, num_steps=num_steps)
        if rank_world and not parallel_first:
            parallel.enable_ulysses(case.model, rank_world[1])
        return case

    out = {}
    c = model()
    out["stock"] = c.run()
    c = model(config=SparseAttentionConfig(**DENSE_PATH))
    out["dense_path"] = c.run()
    out["dense_path_stats"] = c.model.sparse_attention_stats()["calls"]["sparse"]
    c = model(config=SparseAttentionConfig(**SPARSE))
    out["sparse"] = c.run()
    stats = c.model.sparse_attention_stats()
    out["sparse_density"] = stats["density"]
    out["sparse_calls"] = stats["calls"]["sparse"]
    if rank_world:
        out["sparse_apply_first"] = model(parallel_first=False, config=SparseAttentionConfig(**SPARSE)).run()
    c = model(config=_fast_config(), num_steps=len(STEPS))
    out["fast"] = _run_steps(c.model, c.make_inputs, STEPS)
    out["fast_reuse"] = c.model.sparse_attention_stats()["block_reuse"]
    return out


def _ring_errors(rank, world):
    """The messages ring attention raises with: applying to a ring-parallel model, first call after."""
    from _tiny_models import tiny_wan

    return ring_refusals(tiny_wan, world, SparseAttentionConfig(**SPARSE))


def _worker(rank, world, out_dir):
    torch.set_num_threads(1)
    results = _cases((rank, world))
    results["ring_errors"] = _ring_errors(rank, world)
    save_rank_result(results, out_dir, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # The single-process references are computed while the spawned ranks start up (imports dominate).
    return run_ranks_and_single(_worker, WORLD, str(tmp_path_factory.mktemp("ulysses")), _cases)


_close = assert_close


# ---------------------------------------------------------------------------------------------- distributed
def test_stock_under_cp_equals_single_process(runs):
    ranks, single = runs
    for r in ranks:
        _close(r["stock"], single["stock"])


def test_dense_path_under_cp_equals_stock(runs):
    ranks, single = runs
    for r in ranks:
        assert r["dense_path_stats"] > 0  # our path ran (not a pass-through to stock)
        _close(r["dense_path"], single["stock"])


def test_sparse_under_cp_equals_single_process(runs):
    ranks, single = runs
    assert single["sparse_density"] < 0.9  # the config is really sparse
    assert (single["sparse"] - single["stock"]).abs().max() > 1e-3
    for r in ranks:
        assert r["sparse_calls"] == single["sparse_calls"] > 0
        _close(r["sparse"], single["sparse"])
        _close(r["sparse_apply_first"], single["sparse"])


def test_block_reuse_under_cp_equals_single_process_step_by_step(runs):
    ranks, single = runs
    assert single["fast_reuse"]["blocks"]["reused"] > 0
    for r in ranks:
        # decisions depend on the step index only: every rank computes / reuses the same blocks
        assert r["fast_reuse"]["blocks"] == single["fast_reuse"]["blocks"]
        for got, want in zip(r["fast"], single["fast"]):
            _close(got, want)


def test_ring_raises_clear_error(runs):
    ranks, _ = runs
    for r in ranks:
        assert len(r["ring_errors"]) == 2
        for msg in r["ring_errors"]:
            assert "ring context parallelism" in msg and "ulysses_degree" in msg


# ---------------------------------------------------------------------------------------------- no processes
def _fake_processor(ring=1, ulysses=2):
    cp = types.SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses)
    return types.SimpleNamespace(_parallel_config=types.SimpleNamespace(context_parallel_config=cp))


def test_context_parallel_config_rejects_ring_and_ignores_none():
    assert parallel.context_parallel_config(types.SimpleNamespace()) is None
    assert parallel.context_parallel_config(_fake_processor()).ulysses_degree == 2
    with pytest.raises(ValueError, match="ring context parallelism.*ulysses_degree"):
        parallel.context_parallel_config(_fake_processor(ring=2, ulysses=1))


@pytest.mark.parametrize("family", ["cogvideox", "mochi", "flux"])
def test_joint_attention_families_are_refused(family):
    # HunyuanVideo is supported (its own cp plan and shard reordering): tests/test_parallel_hunyuan.py
    with pytest.raises(ValueError, match=f"'{family}' family"):
        parallel.check_supported(family, SparseAttentionConfig())


def test_unsupported_configs_are_refused():
    parallel.check_supported("wan", SparseAttentionConfig())
    with pytest.raises(ValueError, match="block 0"):
        parallel.check_supported(
            "wan", SparseAttentionConfig(reuse_scope="block", reuse_every=2, always_compute_blocks=(-1,))
        )
    with pytest.raises(ValueError, match="mode='sla'"):
        parallel.check_supported("wan", types.SimpleNamespace(mode="sla", reuse_scope="step"))


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 500), count=st.integers(1, 8))
def test_shard_sizes_match_diffusers_split(total, count):
    x = torch.arange(total)
    if total >= count:
        uneven = parallel._shard_sizes(total, count, True)
        assert uneven == [len(c) for c in x.tensor_split(count)]
    even = parallel._shard_sizes(total, count, False)
    if total % count:
        assert even is None
    else:
        assert even == [len(c) for c in x.chunk(count)]


@given(count=st.integers(1, 8), per=st.integers(1, 6))
def test_head_shards_partition_the_heads(count, per):
    heads = [h for i in range(count) for h in parallel.HeadShard(i, count).heads(count * per)]
    assert heads == list(range(count * per))


def test_launch_and_enable_check_their_arguments():
    with pytest.raises(ValueError, match="nprocs"):
        parallel.launch(_worker, 0)
    with pytest.raises(ValueError, match="not initialised"):
        parallel.enable_ulysses(torch.nn.Linear(1, 1), 2)
