"""scripts/bench_patterns.py's whole-run accounting, on CPU: the engine path, the preset cache policies,
and what a run of L layers builds (static patterns once for all layers, dynamic ones per layer)."""

import pytest
import torch

from dit_sparse.layout import TokenLayout
from dit_sparse.presets import PRESETS

from _scripts import load_script  # tests/ helper


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_patterns")


def test_policies_come_from_the_presets(bench):
    assert bench.preset_policy("tile3d") == ("fast", {"refresh_every": None, "drift_threshold": None,
                                                      "share_across_layers": False})
    name, policy = bench.preset_policy("tile3d+topk")
    assert name == "balanced" and policy["refresh_every"] == PRESETS["balanced"].fields["refresh_every"] == 5
    for pattern in ("topk", "spatiotemporal"):
        assert bench.preset_policy(pattern) == bench.preset_policy("tile3d+topk")
    assert set(bench.POLICY_PRESET) == {f["pattern"] for f in bench.PATTERNS.values()}


@pytest.mark.parametrize("name,builds_per_layer,static", [
    ("tile3d_3x3x3", None, True),            # built once for all layers, never refreshed
    ("topk_10%", 2, False),                  # 8 sparse steps, refresh every 5: built at steps 2 and 7
    ("tile3d_3x3x3+topk_5%", 2, False),
])
def test_engine_run_counts_builds_and_lookups_as_the_engine_pays_them(bench, name, builds_per_layer, static):
    tl = TokenLayout(2, 8, 16, tile=(1, 4, 8))  # 256 tokens: two blocks of 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, tl.seq_len, 64, generator=g) for _ in range(3))
    cfg, preset = bench.make_config(bench.PATTERNS[name], tl.tile, backend="torch")
    layers, steps = 3, 10  # 20% dense: steps 0-1 dense, 2-9 sparse
    run = bench.engine_run(cfg, tl, q, k, v, layers=layers, steps=steps)
    assert run["sparse_calls"] == run["lookups"] == layers * 8
    assert run["builds"] == (1 if static else layers * builds_per_layer)
    assert run["hits"] == run["lookups"] - run["builds"]
    assert run["search_s"] == pytest.approx(run["build_s"] + run["hit_s"])
    assert 0 < run["search_s"] < run["wall_s"]


def test_engine_run_rejects_an_unknown_timing(bench):
    tl = TokenLayout(2, 8, 16, tile=(1, 4, 8))
    q = torch.zeros(1, 2, tl.seq_len, 64)
    cfg, _ = bench.make_config(bench.PATTERNS["topk_10%"], tl.tile, backend="torch")
    with pytest.raises(ValueError, match="timing"):
        bench.engine_run(cfg, tl, q, q, q, layers=1, steps=2, timing="wall")


def test_env_info_records_how_busy_the_host_was():
    # The synchronised search timings include host time, so every benchmark records the host's load.
    util = load_script("_bench_util")
    env = util.env_info()
    assert env["host_cpus"] >= 1
    assert env["host_load_1min"] is None or env["host_load_1min"] >= 0
