"""Block-level step caching (``reuse_scope="block"``) on tiny models of all six families (CPU).

A generation here is 5 timesteps with two CFG branches run as separate forwards (different text):
``dense_steps=1, reuse_every=2`` makes steps 0, 1, 3 compute (1 and 3 keep residuals) and steps 2, 4
reuse. Torch forward hooks on every block record each call's input and output streams and whether
any of the block's submodules ran, so the checks look at what the blocks did, not at our counters.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from _tiny_models import BUILDERS
from dit_sparse.apply import apply_sparse_attention, remove_sparse_attention
from dit_sparse.block_cache import BlockCache
from dit_sparse.block_hooks import BLOCK_HOOK_NAME, transformer_blocks
from dit_sparse.config import SparseAttentionConfig
from dit_sparse.presets import PRESETS
from dit_sparse.processors import family_of

TIMESTEPS = (900.0, 700.0, 500.0, 300.0, 100.0)
REUSE_STEPS = {2, 4}
STORE_STEPS = {1, 3}
BASE = dict(pattern="tile3d", window=(1, 1, 1), tile=(1, 4, 4), block_size=64, dense_steps=1)
BLOCK = SparseAttentionConfig(**BASE, reuse_scope="block", reuse_every=2, always_compute_blocks=())
NO_REUSE = SparseAttentionConfig(**BASE)


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def stock_out(case):
    return case.run()


def _uncond_inputs(case, t):
    """The same call with other text: the second CFG branch."""
    inputs = case.make_inputs(t)
    text = inputs["encoder_hidden_states"]
    inputs["encoder_hidden_states"] = torch.randn(text.shape, generator=torch.Generator().manual_seed(7))
    return inputs


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _generation(case, branches=2, timesteps=TIMESTEPS):
    """Outputs ``[(step, branch, output)]`` of one generation (cond then uncond forward per step)."""
    outs = []
    for step, t in enumerate(timesteps):
        outs.append((step, 0, _forward(case.model, case.make_inputs(t))))
        if branches == 2:
            outs.append((step, 1, _forward(case.model, _uncond_inputs(case, t))))
    return outs


class _Recorder:
    """Per block call: (block name, hidden in, encoder in, hidden out, encoder out, submodules ran)."""

    def __init__(self, model):
        from diffusers.hooks._helpers import TransformerBlockRegistry

        self.calls = []
        self.handles = []
        self._ran = 0
        for name, block in transformer_blocks(model, family_of(model)):
            meta = TransformerBlockRegistry.get(type(block))
            self.handles.append(block.register_forward_hook(self._on_block(name, block, meta), with_kwargs=True))
            for child in block.children():
                self.handles.append(child.register_forward_pre_hook(self._on_child))

    def _on_child(self, module, args):
        self._ran += 1

    def _on_block(self, name, block, meta):
        sig = inspect.signature(type(block).forward)

        def hook(module, args, kwargs, output):
            bound = sig.bind(module, *args, **kwargs).arguments
            h_in = bound[meta.hidden_states_argument_name]
            e_in, e_out = None, None
            if isinstance(output, tuple):
                h_out = output[meta.return_hidden_states_index]
                e_in = bound[meta.encoder_hidden_states_argument_name]
                e_out = output[meta.return_encoder_hidden_states_index]
            else:
                h_out = output
            self.calls.append((name, h_in, e_in, h_out, e_out, self._ran > 0))
            self._ran = 0

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _by_step(calls, blocks, branches):
    """Group recorded calls into ``{(step, branch, block name): call}`` (calls come in model order)."""
    per_forward = len(blocks)
    out = {}
    for i, call in enumerate(calls):
        forward, pos = divmod(i, per_forward)
        step, branch = divmod(forward, branches)
        assert call[0] == blocks[pos]
        out[(step, branch, call[0])] = call
    return out


# ---------------------------------------------------------------------------------------------------- per family
@pytest.fixture(scope="module")
def runs(case):
    """One application with block reuse: a recorded generation, a forward that starts a new one, a second
    generation and the pipelines' end-of-call reset; then a generation without any reuse."""
    out = {"names": [n for n, _ in transformer_blocks(case.model, family_of(case.model))]}
    apply_sparse_attention(case.model, BLOCK, num_steps=len(TIMESTEPS))
    engine = case.model._dit_sparse_application.engine
    rec = _Recorder(case.model)
    try:
        out["block"] = _generation(case)
        rec.close()
        out["stats"] = engine.stats()["block_reuse"]
        out["kept_after_first"] = len(engine.block_cache)
        _forward(case.model, case.make_inputs(TIMESTEPS[0]))  # timestep goes up: a new generation
        out["kept_after_restart"] = len(engine.block_cache)
        engine.reset_generation()
        out["second"] = _generation(case)
        case.model._diffusers_hook.reset_stateful_hooks()  # what a pipeline does at the end of a call
        out["kept_after_reset_state"] = len(engine.block_cache)
    finally:
        rec.close()
        remove_sparse_attention(case.model)
    out["calls"] = _by_step(rec.calls, out["names"], branches=2)
    apply_sparse_attention(case.model, NO_REUSE, num_steps=len(TIMESTEPS))
    try:
        out["none"] = _generation(case)
    finally:
        remove_sparse_attention(case.model)
    return out


def test_reuse_steps_skip_blocks_and_add_kept_residual(runs):
    calls = runs["calls"]
    branch_residuals_differ = False
    for (step, branch, name), (_, h_in, e_in, h_out, e_out, ran) in calls.items():
        assert ran == (step not in REUSE_STEPS), (step, branch, name)
        if step not in REUSE_STEPS:
            continue
        _, sh_in, se_in, sh_out, se_out, _ = calls[(step - 1, branch, name)]
        assert torch.equal(h_out, h_in + (sh_out - sh_in))
        if e_in is not None:
            assert torch.equal(e_out, e_in + (se_out - se_in))
        other = calls[(step - 1, 1 - branch, name)]
        branch_residuals_differ |= not torch.equal(sh_out - sh_in, other[3] - other[1])
    assert branch_residuals_differ  # so reusing the other branch's residual would have failed above
    n = len(runs["names"])
    stats = runs["stats"]
    assert stats["blocks"] == {"computed": 3 * 2 * n, "reused": 2 * 2 * n, "fallback": 0}
    assert stats["steps"] == {"computed": 3, "reused": 2}
    assert stats["attention_calls_skipped"] == 2 * 2 * n  # one self-attention layer per block
    assert stats["kept"] == 2 * n and stats["memory_bytes"] > 0


def test_computing_steps_match_a_run_without_reuse(runs):
    for (step, branch, a), (_, _, b) in zip(runs["block"], runs["none"]):
        if step in REUSE_STEPS:
            assert not torch.equal(a, b), (step, branch)
        else:
            assert torch.equal(a, b), (step, branch)


def test_residuals_reset_between_generations(runs):
    assert runs["kept_after_first"] == 2 * len(runs["names"])
    assert runs["kept_after_restart"] == 0 and runs["kept_after_reset_state"] == 0
    assert all(torch.equal(a[2], b[2]) for a, b in zip(runs["block"], runs["second"]))


def test_remove_restores_stock_bit_identical(case, stock_out):
    blocks = [b for _, b in transformer_blocks(case.model, family_of(case.model))]
    apply_sparse_attention(case.model, BLOCK, num_steps=len(TIMESTEPS))
    assert all(b._diffusers_hook.get_hook(BLOCK_HOOK_NAME) is not None for b in blocks)
    try:
        _generation(case, branches=1)
    finally:
        remove_sparse_attention(case.model)
    assert torch.equal(case.run(), stock_out)
    assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in [case.model, *blocks])


# ---------------------------------------------------------------------------------------------------- Wan only
@pytest.fixture(scope="module")
def wan():
    return BUILDERS["wan"]()


@pytest.mark.parametrize("always, reused_blocks", [
    ((0, -1), set()), ((-1,), {"blocks.0"}), ((), {"blocks.0", "blocks.1"}),
])
def test_always_compute_blocks(wan, always, reused_blocks):
    cfg = BLOCK.copy(always_compute_blocks=always)
    apply_sparse_attention(wan.model, cfg, num_steps=len(TIMESTEPS))
    rec = _Recorder(wan.model)
    try:
        _generation(wan, branches=1)
        stats = wan.model.sparse_attention_stats()["block_reuse"]
    finally:
        rec.close()
        remove_sparse_attention(wan.model)
    calls = _by_step(rec.calls, ["blocks.0", "blocks.1"], branches=1)
    for (step, _, name), call in calls.items():
        assert call[5] == (step not in REUSE_STEPS or name not in reused_blocks)
    assert stats["blocks"]["reused"] == len(REUSE_STEPS) * len(reused_blocks)


def test_always_compute_blocks_out_of_range_is_refused_before_any_change(wan):
    processors = {n: m.processor for n, m in wan.model.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match=r"always_compute_blocks index 2 is out of range for the 2 transformer"):
        apply_sparse_attention(wan.model, BLOCK.copy(always_compute_blocks=(2,)), num_steps=5)
    assert {n: m.processor for n, m in wan.model.named_modules() if hasattr(m, "processor")} == processors
    assert not any("_diffusers_hook" in m.__dict__ for m in wan.model.modules())
    assert not hasattr(wan.model, "sparse_attention_stats")


def test_batched_cfg_keeps_one_residual_for_its_batch(wan):
    def batched(t):
        cond, uncond = wan.make_inputs(t), _uncond_inputs(wan, t)
        return {k: torch.cat([cond[k], uncond[k]]) if k != "timestep" else v.repeat(2) for k, v in cond.items()}

    apply_sparse_attention(wan.model, BLOCK, num_steps=len(TIMESTEPS))
    engine = wan.model._dit_sparse_application.engine
    rec = _Recorder(wan.model)
    try:
        outs = [_forward(wan.model, batched(t)) for t in TIMESTEPS]
        stats = engine.stats()["block_reuse"]
    finally:
        rec.close()
        remove_sparse_attention(wan.model)
    calls = _by_step(rec.calls, ["blocks.0", "blocks.1"], branches=1)
    for name in ("blocks.0", "blocks.1"):
        _, h_in, _, h_out, _, ran = calls[(2, 0, name)]
        _, sh_in, _, sh_out, _, _ = calls[(1, 0, name)]
        assert not ran and h_in.shape[0] == 2
        assert torch.equal(h_out, h_in + (sh_out - sh_in))
    assert stats["kept"] == 2  # one per block: branch 0 holds the whole batch
    assert outs[2].shape[0] == 2


def test_missing_branch_residual_falls_back_to_computing(wan):
    """A second CFG branch first seen on a reuse step computes there and keeps its residual."""
    results = {}
    for label, cfg in (("block", BLOCK), ("none", NO_REUSE)):
        apply_sparse_attention(wan.model, cfg, num_steps=3)
        try:
            _forward(wan.model, wan.make_inputs(900.0))
            _forward(wan.model, wan.make_inputs(700.0))
            results[label] = (_forward(wan.model, wan.make_inputs(500.0)),
                              _forward(wan.model, _uncond_inputs(wan, 500.0)))
            stats = wan.model.sparse_attention_stats()["block_reuse"]
        finally:
            remove_sparse_attention(wan.model)
        if label == "block":
            assert stats["blocks"] == {"computed": 6, "reused": 2, "fallback": 2}
    assert not torch.equal(results["block"][0], results["none"][0])  # branch 0 reused
    assert torch.equal(results["block"][1], results["none"][1])  # branch 1 computed


def test_attention_scope_registers_no_block_hooks(wan):
    apply_sparse_attention(wan.model, NO_REUSE.copy(reuse_every=2, reuse_mode="output"), num_steps=5)
    try:
        blocks = [b for _, b in transformer_blocks(wan.model, family_of(wan.model))]
        assert not any("_diffusers_hook" in b.__dict__ for b in blocks)
        assert wan.model.sparse_attention_stats()["block_reuse"] is None
    finally:
        remove_sparse_attention(wan.model)


def test_block_scope_turns_attention_reuse_off():
    from dit_sparse.engine import SparseAttentionEngine

    engine = SparseAttentionEngine(BLOCK.copy(reuse_mode="output"), num_steps=5)
    attention = [engine.schedule.decide(s, 0, 5, 2).mode for s in range(5)]
    assert attention == ["dense", "sparse", "sparse", "sparse", "sparse"]
    assert [engine.block_cache.decide(s, 5).mode for s in range(5)] == ["dense", "sparse", "reuse", "sparse", "reuse"]


def test_block_cache_lookup_rejects_stale_or_misfit_residuals():
    cache = BlockCache(dense_steps=0, reuse_every=2)
    r = torch.ones(1, 4, 8)
    cache.store(("b", 0), (r, None), None, step=2)
    assert cache.lookup(("b", 0), 3, (torch.zeros(1, 4, 8), None)) is not None
    assert cache.lookup(("b", 0), 2, (torch.zeros(1, 4, 8), None)) is None  # not computed before this step
    assert cache.lookup(("b", 0), 3, (torch.zeros(1, 5, 8), None)) is None  # other shape
    assert cache.lookup(("b", 1), 3, (torch.zeros(1, 4, 8), None)) is None  # other branch
    assert cache.memory_bytes() == r.numel() * 4
    cache.reset()
    assert len(cache) == 0 and cache.lookup(("b", 0), 3, (torch.zeros(1, 4, 8), None)) is None


def test_fast_and_turbo_presets_reuse_blocks():
    fast, turbo = SparseAttentionConfig.preset("fast"), SparseAttentionConfig.preset("turbo")
    assert (fast.reuse_scope, fast.reuse_every, turbo.reuse_scope, turbo.reuse_every) == ("block", 2, "block", 3)
    for name in ("quality", "balanced"):
        cfg = SparseAttentionConfig.preset(name)
        assert cfg.reuse_every is None and cfg.reuse_scope == "attention"
    for name in ("fast", "turbo"):
        assert "block" in PRESETS[name].description
