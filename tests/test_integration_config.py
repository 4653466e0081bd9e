"""SparseAttentionConfig validation and serialisation, and the named presets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.config import SparseAttentionConfig
from dit_sparse.engine import SparseAttentionEngine, build_pattern
from dit_sparse.presets import PRESETS, describe_presets


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(["tile3d", "spatiotemporal", "tile3d+topk", "topk", "dense"]),
    window=st.tuples(*[st.integers(1, 7)] * 3),
    ratio=st.floats(0.01, 1.0),
    dense_steps=st.one_of(st.integers(0, 50), st.floats(0.0, 0.99)),
    reuse=st.one_of(st.none(), st.integers(1, 4)),
    layers=st.lists(st.integers(0, 40), max_size=4),
    scope=st.sampled_from(["attention", "block"]),
    always=st.lists(st.integers(-40, 40), max_size=4),
)
def test_to_dict_from_dict_round_trip_through_json(pattern, window, ratio, dense_steps, reuse, layers, scope, always):
    topk = "topk" in pattern
    cfg = SparseAttentionConfig(pattern=pattern, window=window, topk_ratio=ratio if topk else None,
                                dense_steps=dense_steps, reuse_every=reuse, dense_layers=layers,
                                reuse_scope=scope, always_compute_blocks=always)
    again = SparseAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.dense_layers == tuple(sorted(set(layers)))
    assert again.reuse_scope == scope and again.always_compute_blocks == tuple(dict.fromkeys(always))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "fast"}, "mode must be one of"),
    ({"pattern": "tile3d+blah"}, "unknown pattern 'blah'"),
    ({"pattern": "topk"}, "exactly one of topk_ratio"),
    ({"pattern": "topk", "topk_ratio": 0.1, "topk_threshold": 0.9}, "exactly one of topk_ratio"),
    ({"topk_ratio": 0.1}, "has no topk"),
    ({"pattern": "topk", "topk_ratio": 1.5}, r"in \(0, 1\]"),
    ({"window": (3, 3)}, "window must be a"),
    ({"tile": (4, 0, 4)}, "tile must be a"),
    ({"block_size": 100}, "block_size must be one of"),
    ({"dense_steps": 1.5}, r"fraction of the steps and must be in \[0, 1\)"),
    ({"dense_steps": -1}, "dense_steps must be >= 0"),
    ({"reuse_every": 0}, "reuse_every must be None or an int >= 1"),
    ({"reuse_mode": "both"}, "reuse_mode must be one of"),
    ({"reuse_scope": "layer"}, "reuse_scope must be one of 'attention', 'block'"),
    ({"always_compute_blocks": "0,-1"}, "always_compute_blocks must be a list of block indices"),
    ({"always_compute_blocks": 3}, "always_compute_blocks must be a list of block indices"),
    ({"always_compute_blocks": (0, 1.5)}, "always_compute_blocks entries must be ints"),
    ({"drift_threshold": -0.1}, "drift_threshold"),
    ({"dense_layers": [1], "skip_layers": [1]}, "both dense_layers and skip_layers"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"text_always_on": 1}, "text_always_on must be True or False"),
])
def test_bad_fields_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseAttentionConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown SparseAttentionConfig keys"):
        SparseAttentionConfig.from_dict({"sparsity": 0.9})


def test_presets_build_valid_configs_and_patterns():
    assert set(PRESETS) == {"quality", "balanced", "fast", "turbo", "dense"}
    for name, preset in PRESETS.items():
        cfg = SparseAttentionConfig.preset(name)
        assert cfg.preset_name == name and preset.description
        assert build_pattern(cfg, text_len=16).name
        SparseAttentionEngine(cfg)
    assert len(describe_presets().splitlines()) == len(PRESETS)
    assert SparseAttentionConfig.preset("fast", dense_steps=0.3).dense_steps == 0.3
    assert SparseAttentionConfig().reuse_scope == "attention"  # the default reuses nothing at block level
    with pytest.raises(ValueError, match="unknown preset 'ultra'"):
        SparseAttentionConfig.preset("ultra")


def test_preset_copies_are_independent():
    a = SparseAttentionConfig.preset("fast")
    a.dense_steps = 0.5
    assert SparseAttentionConfig.preset("fast").dense_steps != 0.5


def test_pattern_union_follows_config():
    cfg = SparseAttentionConfig(pattern="tile3d+topk", topk_ratio=0.1, first_frame_sink=1)
    assert build_pattern(cfg, text_len=0).name == "tile3d_w3x3x3+topk_r0.1+first_frame_sink_f1"
    assert "text_always_on" in build_pattern(cfg, text_len=8).name
    assert build_pattern(SparseAttentionConfig(mode="dense"), 8).name == "dense"


def test_sla_mode_builds_an_engine_and_round_trips():
    cfg = SparseAttentionConfig(mode="sla", sla_topk=0.1, sla_feature_map="elu", sla_weights="runs/sla/w.safetensors")
    assert SparseAttentionEngine(cfg).sla_modules == {}  # filled by apply_sparse_attention
    assert SparseAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_preset_measurements_are_the_benchmark_numbers(tmp_path):
    """dit_sparse/presets_measured.json is what scripts/record_preset_measurements.py makes of the
    benchmark files in benchmarks/ - so nobody edits the numbers users see by hand."""
    import json
    import pathlib

    from _scripts import load_script

    root = pathlib.Path(__file__).resolve().parents[1]
    script = load_script("record_preset_measurements")
    out = tmp_path / "measured.json"
    assert script.main(["--out", str(out)]) == 0
    shipped = json.loads((root / "dit_sparse" / "presets_measured.json").read_text())
    assert json.loads(out.read_text()) == shipped
    for name, preset in PRESETS.items():
        assert preset.measured == shipped.get(name)
    e2e = json.loads((root / "benchmarks" / "e2e.json").read_text())
    dense = e2e["wan"]["dense"]["time_per_step_s"]
    assert shipped["fast"]["speedup"] == round(dense / e2e["wan"]["presets"]["fast"]["time_per_step_s"], 3)
