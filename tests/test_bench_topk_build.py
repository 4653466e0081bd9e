"""scripts/bench_topk_build.py on CPU: one case end to end on a tiny shape (Triton interpreter, timings
stubbed), also above the fused bound, and the tile sweep, a failing case recorded instead of ending the
run, and the report written atomically."""

import json
import os

import pytest
import torch

from _scripts import load_script  # tests/ helper

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter"),
]


@pytest.fixture()
def bench(monkeypatch):
    module = load_script("bench_topk_build")
    calls = []
    monkeypatch.setattr(module, "bench_ms", lambda fn: calls.append(fn()) or 1.0)
    monkeypatch.setattr(module, "SHAPES", {"tiny": ((2, 4, 4), (1, 2, 2), 2)})
    monkeypatch.setattr(module, "HEAD_DIM", 8)
    monkeypatch.setattr(module, "BLOCK", 4)
    monkeypatch.setattr(module, "HOST_REPS", 1)
    return module


def test_one_case_end_to_end_and_report(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SWEEP_ROWS", (2,))
    monkeypatch.setattr(bench, "SWEEP_WARPS", (4,))
    monkeypatch.setattr(bench, "POOL_SWEEP", ((2, 1, None), (4, 2, 4), (1, 4, 8)))
    payload = bench.run_bench(attention=False, log=lambda row: None, device="cpu", sweep=True)
    assert [(r["shape"], r["rule"]) for r in payload["results"]] == [("tiny", "ratio0.1"), ("tiny", "threshold0.9")]
    for r in payload["results"]:
        assert "error" not in r, r.get("traceback")
        assert r["kv_blocks"] == 8 and r["rows"] == 2 * 8 and r["rows_differ"] == 0
        assert r["fused_build_ms"] == r["chain_build_ms"] == r["select_ms"] == 1.0 and r["speedup"] == 1.0
        assert r["topk_path"] == "fused"
    ratio, threshold = payload["results"]  # the ratio rule's select also by sort, keeping the same blocks
    assert ratio["ratio_select_same"] is True and ratio["sort_select_ms"] == ratio["bisect_select_ms"] == 1.0
    assert "sort_select_ms" not in threshold
    sweep = payload["select_sweep"]
    assert [(r["rule"], r["block_m"]) for r in sweep] == [("ratio0.1", 2), ("threshold0.9", 2)]
    assert all(r["select_ms"] == 1.0 and r["num_warps"] == 4 for r in sweep)
    pool = payload["pool_sweep"]  # other tiles, the same means
    assert [(r["block_rows"], r["blocks_per_program"]) for r in pool] == [(2, 1), (4, 2), (1, 4)]
    assert all("error" not in r and r["pool_ms"] == 1.0 and r["max_diff"] < 1e-5 for r in pool), pool
    from _bench_util import write_report  # scripts/ is on sys.path once the module is loaded

    md = bench.to_markdown(payload)
    write_report(str(tmp_path), "topk_build", payload, md)
    assert json.loads((tmp_path / "topk_build.json").read_text())["results"][0]["shape"] == "tiny"
    text = (tmp_path / "topk_build.md").read_text()
    assert "| tiny | ratio0.1 | fused |" in text and "| tiny | threshold0.9 | fused |" in text
    assert "| tiny | ratio0.1 | 2 | 4 | 1 |" in text  # the sweep's table
    assert "| tiny | 4 | 2 | 4 | 1 |" in text  # the pooling sweep's


def test_above_the_fused_bound_the_fused_build_is_timed(bench, monkeypatch):
    # TopK takes the chain above FUSED_MAX_KV_BLOCKS; the fused build is still timed there (to see where
    # the bound should be).
    from dit_sparse.kernels.block_score import topk_layout

    monkeypatch.setattr(topk_layout, "FUSED_MAX_KV_BLOCKS", 4)
    payload = bench.run_bench(rules=["threshold0.9"], attention=False, log=lambda row: None, device="cpu")
    assert [(r["topk_path"], r["fused_build_ms"], r["rows_differ"]) for r in payload["results"]] == [
        ("chain", 1.0, 0)]


def test_failing_case_is_recorded(bench, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no such luck")

    monkeypatch.setattr(bench, "make_qk", boom)
    payload = bench.run_bench(rules=["ratio0.1"], attention=False, log=lambda row: None, device="cpu")
    (row,) = payload["results"]
    assert row["error"] == "RuntimeError: no such luck" and "traceback" in row
    assert "error: RuntimeError" in bench.to_markdown(payload)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")
def test_main_without_gpu_exits_2(bench, tmp_path):
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())
