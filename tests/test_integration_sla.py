"""``mode="sla"`` through apply_sparse_attention on tiny models (CPU, PyTorch backend of the SLA op).

An SLA module whose projection is zero is block-sparse attention over its top-k blocks, so a model in
SLA mode must match the same model in sparse mode with ``pattern="topk"`` at the same ratio (text rows
not forced on: SLA picks its blocks by score only). Also: the modules are submodules of the attention
modules (parameters, ``.to()``), gradients reach their projections, weights go through a safetensors
file and back, bad files are refused before anything changes, and remove restores the stock model.
"""

from __future__ import annotations

import pytest
import torch

from _tiny_models import BUILDERS
from dit_sparse.apply import apply_sparse_attention, remove_sparse_attention, sla_modules
from dit_sparse.config import SparseAttentionConfig
from dit_sparse.sla import SparseLinearAttention, load_sla_weights, save_sla_weights

COMMON = dict(dense_steps=0, block_size=64, tile=(1, 4, 4), text_always_on=False)
SLA = SparseAttentionConfig(mode="sla", sla_topk=0.5, **COMMON)
TOPK = SparseAttentionConfig(pattern="topk", topk_ratio=0.5, **COMMON)
# Families whose processors pass no text-key mask: there SLA and sparse mode see the same sequence.
UNMASKED = ["wan", "cogvideox", "ltx", "flux"]


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if n and callable(getattr(m, "processor", None))}


def _randomize(modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules.values():
            m.proj.weight.copy_(torch.randn(m.proj.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def wan():
    return BUILDERS["wan"]()


@pytest.mark.parametrize("family", UNMASKED)
def test_zero_projection_equals_block_sparse_topk(family):
    case = BUILDERS[family]()
    outs, stats = {}, {}
    for label, cfg in (("sla", SLA), ("topk", TOPK)):
        apply_sparse_attention(case.model, cfg)
        try:
            if label == "sla":
                modules = sla_modules(case.model)
                assert modules and all(not m.proj.weight.detach().any() for m in modules.values())
            outs[label] = case.run()
            stats[label] = case.model.sparse_attention_stats()
        finally:
            remove_sparse_attention(case.model)
    torch.testing.assert_close(outs["sla"], outs["topk"], rtol=1e-5, atol=1e-5)
    assert stats["sla"]["calls"]["sparse"] == stats["sla"]["layers"] == len(modules)
    assert stats["sla"]["density"] == pytest.approx(stats["topk"]["density"], rel=1e-6)
    assert 0.0 < stats["sla"]["density"] < 1.0


def test_modules_are_submodules_and_a_nonzero_projection_changes_the_output(wan):
    stock = wan.run()
    apply_sparse_attention(wan.model, SLA)
    try:
        modules = sla_modules(wan.model)
        assert list(modules) == ["blocks.0.attn1", "blocks.1.attn1"]
        assert all(wan.model.get_submodule(f"{n}.sla") is m for n, m in modules.items())
        names = {n for n, _ in wan.model.named_parameters()}
        assert {f"{n}.sla.proj.weight" for n in modules} <= names
        zero = wan.run()
        _randomize(modules)
        changed = wan.run()
        wan.model.to(torch.float64)
        assert all(m.proj.weight.dtype == torch.float64 for m in modules.values())
        wan.model.to(torch.float32)
    finally:
        remove_sparse_attention(wan.model)
    assert not torch.allclose(zero, changed, atol=1e-4)
    assert sla_modules(wan.model) == {}
    assert not any("sla" in n for n, _ in wan.model.named_parameters())
    assert torch.equal(wan.run(), stock)


def _sla_grads(case, checkpointing: bool) -> dict:
    apply_sparse_attention(case.model, SLA)
    try:
        modules = sla_modules(case.model)
        _randomize(modules)
        if checkpointing:
            case.model.enable_gradient_checkpointing()
        case.model.train()
        out = case.model(**case.make_inputs(500.0), return_dict=False)[0]
        out.square().mean().backward()
        grads = {f"{n}.sla": m.proj.weight.grad for n, m in modules.items()}
        grads["to_q"] = case.model.blocks[0].attn1.to_q.weight.grad
    finally:
        case.model.eval()
        case.model.disable_gradient_checkpointing()
        case.model.zero_grad(set_to_none=True)
        remove_sparse_attention(case.model)
    return grads


def test_gradients_reach_the_sla_projections_also_with_checkpointing(wan):
    """Checkpointed blocks recompute in backward, after the forward ended: they must run SLA again."""
    plain, checkpointed = _sla_grads(wan, False), _sla_grads(wan, True)
    assert all(g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 0 for g in plain.values())
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)


def test_weights_round_trip_through_a_file(wan, tmp_path):
    path = tmp_path / "sla_weights.safetensors"
    cfg = SLA.copy(sla_topk=0.25, sla_feature_map="elu")
    apply_sparse_attention(wan.model, cfg)
    try:
        _randomize(sla_modules(wan.model), seed=3)
        expected = wan.run()
        save_sla_weights(sla_modules(wan.model), path)
    finally:
        remove_sparse_attention(wan.model)
    saved = load_sla_weights(path)
    apply_sparse_attention(wan.model, SparseAttentionConfig(mode="sla", sla_weights=str(path), **COMMON))
    try:
        loaded = sla_modules(wan.model)
        got = wan.run()
    finally:
        remove_sparse_attention(wan.model)
    assert set(loaded) == set(saved)
    for name, module in loaded.items():
        assert (module.topk, module.feature_map) == (0.25, "elu")  # taken from the file
        assert torch.equal(module.proj.weight, saved[name].proj.weight)
    assert torch.equal(got, expected)


def _write(path, modules):
    save_sla_weights(modules, path)
    return str(path)


@pytest.mark.parametrize("kind, match", [
    ("missing", "has no entry for layer 'blocks.1.attn1'"),
    ("extra", "has layers this model does not run SLA on: blocks.2.attn1"),
    ("feature_map", "trained with feature map 'relu'; set sla_feature_map='relu'"),
    ("block_size", "trained with block size 128; set block_size=128"),
    ("head_dim", "has head_dim 32 but the model's layer has 64"),
])
def test_weights_that_do_not_fit_are_refused_before_any_change(wan, tmp_path, kind, match):
    def sla(**kw):
        return SparseLinearAttention(**{"head_dim": 64, "block_q": 64, "block_kv": 64, **kw})

    layers = {"blocks.0.attn1": sla(), "blocks.1.attn1": sla()}
    if kind == "missing":
        del layers["blocks.1.attn1"]
    elif kind == "extra":
        layers["blocks.2.attn1"] = sla()
    elif kind == "feature_map":
        layers["blocks.1.attn1"] = sla(feature_map="relu")
    elif kind == "block_size":
        layers["blocks.0.attn1"] = sla(block_q=128, block_kv=128)
    elif kind == "head_dim":
        layers["blocks.0.attn1"] = sla(head_dim=32)
    path = _write(tmp_path / f"{kind}.safetensors", layers)
    before = _processors(wan.model)
    fmap = "softmax" if kind == "feature_map" else None  # None would take each layer's map from the file
    with pytest.raises(ValueError, match=match):
        apply_sparse_attention(wan.model, SparseAttentionConfig(mode="sla", sla_weights=path, sla_feature_map=fmap,
                                                                **COMMON))
    assert _processors(wan.model) == before
    assert sla_modules(wan.model) == {} and not hasattr(wan.model, "sparse_attention_stats")


def test_padded_text_keys_are_refused_with_a_reason():
    case = BUILDERS["mochi"]()  # its tiny prompt has 6 padded text tokens
    apply_sparse_attention(case.model, SLA)
    try:
        with pytest.raises(ValueError, match="mode='sla' cannot mask padded text keys"):
            case.run()
        inputs = case.make_inputs(500.0)
        inputs["encoder_attention_mask"] = torch.ones_like(inputs["encoder_attention_mask"])
        with torch.no_grad():
            out = case.model(**inputs, return_dict=False)[0]
    finally:
        remove_sparse_attention(case.model)
    assert torch.isfinite(out).all()


def test_sla_fields_are_checked():
    with pytest.raises(ValueError, match="only apply to mode='sla'"):
        SparseAttentionConfig(sla_topk=0.1)
    with pytest.raises(ValueError, match=r"sla_topk .* must be in \(0, 1\]"):
        SparseAttentionConfig(mode="sla", sla_topk=0.0)
    with pytest.raises(ValueError, match="sla_feature_map must be one of"):
        SparseAttentionConfig(mode="sla", sla_feature_map="cosine")
    with pytest.raises(ValueError, match="no SLA weights file"):
        apply_sparse_attention(BUILDERS["ltx"]().model,
                               SparseAttentionConfig(mode="sla", sla_weights="/nonexistent.safetensors"))
    with pytest.raises(ValueError, match="pass pipe.transformer"):
        sla_modules(object())
