"""apply / remove / SparseAttnProcessor on tiny random-config models of all six families (CPU).

One parametrisation runs the same checks on every family: a density-1 config reproduces the stock
output, a sparse config changes it with the expected density, remove restores bit-identical outputs,
the one-instance ``SparseAttnProcessor`` and processors rebuilt with ``proc.__class__()`` work.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny_models import BUILDERS
from dit_sparse.apply import apply_sparse_attention, remove_sparse_attention
from dit_sparse.config import SparseAttentionConfig
from dit_sparse.processors import SparseAttnProcessor, families

FAMILIES = list(BUILDERS)
DENSE = SparseAttentionConfig(mode="dense", pattern="dense", dense_steps=0, block_size=64)
# 1x1x1-tile windows over 1x4x4 tiles: each query block keeps few key blocks (density well below 1).
SPARSE = SparseAttentionConfig(pattern="tile3d", window=(1, 1, 1), tile=(1, 4, 4), dense_steps=0, block_size=64)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def stock_out(case):
    return case.run()


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if n and callable(getattr(m, "processor", None))]


def _set_everywhere(model, proc):
    """``set_attn_processor`` where the model has it; ``.processor`` on modules without ``set_processor``."""
    for _, module in _attention_modules(model):
        if hasattr(module, "set_processor"):
            module.set_processor(proc)
        else:
            module.processor = proc


def test_dense_config_matches_stock(case, stock_out):
    apply_sparse_attention(case.model, DENSE)
    try:
        out = case.run()
        stats = case.model.sparse_attention_stats()
    finally:
        remove_sparse_attention(case.model)
    torch.testing.assert_close(out, stock_out, rtol=1e-4, atol=1e-5)
    assert stats["calls"]["sparse"] == stats["layers"] > 0
    assert stats["density"] == pytest.approx(1.0)
    assert stats["calls"]["passthrough"] == {}


def test_sparse_config_differs_with_expected_density(case, stock_out):
    from dit_sparse.engine import build_pattern
    from dit_sparse.layout import TokenLayout
    from dit_sparse.patterns import PatternContext

    apply_sparse_attention(case.model, SPARSE)
    try:
        out = case.run()
        stats = case.model.sparse_attention_stats()
    finally:
        remove_sparse_attention(case.model)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, stock_out, atol=1e-4)
    tl = TokenLayout(*case.grid, text_len=case.text_len, tile=SPARSE.tile)
    expected = build_pattern(SPARSE, case.text_len).build(PatternContext(tl, block_q=64, block_kv=64)).density()
    assert stats["density"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert 0.0 < stats["density"] < 1.0
    # tile3d is static (no q/k): one layout serves every layer, built once.
    assert stats["cache"]["misses"] == 1
    assert stats["cache"]["hits"] == stats["layers"] - 1


def test_remove_restores_original_processors_bit_identical(case, stock_out):
    before = {n: m.processor for n, m in _attention_modules(case.model)}
    apply_sparse_attention(case.model, SPARSE)
    apply_sparse_attention(case.model, DENSE)  # applying twice replaces the first application
    assert any(m.processor is not before[n] for n, m in _attention_modules(case.model))
    remove_sparse_attention(case.model)
    after = {n: m.processor for n, m in _attention_modules(case.model)}
    assert all(after[n] is before[n] for n in before)
    assert not hasattr(case.model, "sparse_attention_stats")
    assert torch.equal(case.run(), stock_out)


def test_one_instance_processor(case, stock_out):
    originals = {n: m.processor for n, m in _attention_modules(case.model)}
    proc = SparseAttnProcessor(SPARSE)
    _set_everywhere(case.model, proc)
    try:
        first = case.run()  # finds its transformer, installs the hook, computes this forward as stock
        second = case.run()
        stats = case.model.sparse_attention_stats()
    finally:
        remove_sparse_attention(case.model)
        for name, p in originals.items():
            _set_processor(case.model.get_submodule(name), p)
    torch.testing.assert_close(first, stock_out, rtol=1e-4, atol=1e-5)
    apply_sparse_attention(case.model, SPARSE)
    try:
        via_apply = case.run()
    finally:
        remove_sparse_attention(case.model)
    torch.testing.assert_close(second, via_apply, rtol=1e-5, atol=1e-6)
    assert stats["calls"]["sparse"] == stats["layers"]


def _set_processor(module, proc):
    if hasattr(module, "set_processor"):
        module.set_processor(proc)
    else:
        module.processor = proc


def test_rebuilt_processor_computes_stock(case, stock_out):
    originals = {n: m.processor for n, m in _attention_modules(case.model)}
    apply_sparse_attention(case.model, SPARSE)
    try:
        for name, module in _attention_modules(case.model):
            _set_processor(module, module.processor.__class__())  # unbound: the stock computation
        out = case.run()
    finally:
        remove_sparse_attention(case.model)
        for name, p in originals.items():
            _set_processor(case.model.get_submodule(name), p)
    torch.testing.assert_close(out, stock_out, rtol=1e-4, atol=1e-5)
    fresh = SparseAttnProcessor().__class__()
    assert isinstance(fresh, SparseAttnProcessor)


def test_config_not_mutated_and_copied(case):
    cfg = copy.deepcopy(SPARSE)
    before = cfg.to_dict()
    apply_sparse_attention(case.model, cfg)
    try:
        engine_cfg = case.model._dit_sparse_application.engine.config
    finally:
        remove_sparse_attention(case.model)
    assert cfg.to_dict() == before and engine_cfg is not cfg


def test_hunyuan_masked_text_keys_stay_masked():
    case = BUILDERS["hunyuan_video"]()
    base = case.make_inputs(500.0)
    changed = dict(base)
    text = base["encoder_hidden_states"].clone()
    text[:, 7:] = torch.randn(text[:, 7:].shape, generator=torch.Generator().manual_seed(9)) * 10
    changed["encoder_hidden_states"] = text
    apply_sparse_attention(case.model, SPARSE)
    try:
        with torch.no_grad():
            a = case.model(**base, return_dict=False)[0]
            b = case.model(**changed, return_dict=False)[0]
    finally:
        remove_sparse_attention(case.model)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unsupported_model_error_lists_supported_classes():
    with pytest.raises(ValueError, match="WanTransformer3DModel.*FluxTransformer2DModel"):
        apply_sparse_attention(torch.nn.Linear(2, 2), SPARSE)
    with pytest.raises(ValueError, match="pipeline"):
        apply_sparse_attention(object(), SPARSE)


def test_every_family_processor_subclasses_the_stock_one():
    for fam in families():
        name = next(n for n in ("transformer_blocks.0.attn", "transformer_blocks.0.attn1")
                    if fam.is_self_attention(n, None))
        assert issubclass(fam.processor_cls, type(fam.stock_processor(name, None)))
        proc = fam.processor_cls()
        assert proc.engine is None  # needs no arguments, unbound until apply


def test_step_schedule_and_reuse_across_forwards():
    case = BUILDERS["wan"]()
    cfg = SparseAttentionConfig(pattern="tile3d", window=(1, 1, 1), tile=(1, 4, 4), block_size=64,
                                dense_steps=1, reuse_every=2, reuse_mode="output")
    apply_sparse_attention(case.model, cfg, num_steps=4)
    engine = case.model._dit_sparse_application.engine
    seen = []
    try:
        for t in (900.0, 900.0, 700.0, 500.0, 300.0):  # the repeated timestep is a second CFG branch
            case.run(t)
            seen.append(dict(engine.counts))
        stats = case.model.sparse_attention_stats()
    finally:
        remove_sparse_attention(case.model)
    layers = 2
    assert [s.get("dense", 0) for s in seen] == [layers, 2 * layers, 2 * layers, 2 * layers, 2 * layers]
    assert [s.get("sparse", 0) for s in seen] == [0, 0, layers, layers, 2 * layers]
    assert [s.get("reuse", 0) for s in seen] == [0, 0, 0, layers, layers]
    assert stats["steps"] == 4 and stats["transformer_calls"] == 5


def test_torch_compile_eager_backend_matches():
    case = BUILDERS["wan"]()
    apply_sparse_attention(case.model, SPARSE)
    try:
        expected = case.run()
        compiled = torch.compile(case.model, backend="eager")
        with torch.no_grad():
            got = compiled(**case.make_inputs(500.0), return_dict=False)[0]
            got2 = compiled(**case.make_inputs(400.0), return_dict=False)[0]
        stats = case.model.sparse_attention_stats()
    finally:
        remove_sparse_attention(case.model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got2).all()
    # 500 twice (a second branch of step 0), then 400: two steps, three transformer calls
    assert stats["steps"] == 2 and stats["transformer_calls"] == 3
