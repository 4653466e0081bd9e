"""scripts/bench_kernels.py on CPU (the benchmark itself needs a GPU): its interleaved rounds - every job
once per round, the median of the rounds that succeeded, a failing round logged and left out - and the
--rounds option."""

import pytest

from _scripts import load_script  # tests/ helper


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_kernels")


def test_rounds_interleave_and_take_the_median(bench):
    order = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def job(name):
        def run():
            order.append(name)
            return next(times[name])
        return run

    out = bench.interleaved_medians({"a": job("a"), "b": job("b")}, rounds=3, log=lambda m: None)
    assert order == ["a", "b"] * 3  # one of each per round, not three of one then three of the other
    assert out == {"a": (2.0, [3.0, 1.0, 2.0]), "b": (5.0, [5.0, 4.0, 6.0])}


def test_failing_rounds_are_logged_and_left_out(bench):
    calls, logged = iter([RuntimeError("out of memory"), 2.0]), []

    def flaky():
        got = next(calls)
        if isinstance(got, Exception):
            raise got
        return got

    def broken():
        raise ValueError("no such backend")

    out = bench.interleaved_medians({"flaky": flaky, "broken": broken}, rounds=2, log=logged.append)
    assert out == {"flaky": (2.0, [2.0]), "broken": (None, [])}
    assert any("out of memory" in m for m in logged) and sum("no such backend" in m for m in logged) == 2


def test_rounds_option(bench):
    assert bench.parse_args([]).rounds == 1
    assert bench.parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_markdown_names_the_forward_schedule_per_shape(bench):
    info = dict(gpu="H200", date="d", torch="t", triton="tr", cuda="c", cudnn=1, fwd_kernel="hopper (Gluon)",
                dkdv_kernel="hopper (Gluon)", dq_kernel="hopper (Gluon)")
    assert "schedule" not in bench.build_markdown(info, [], {}, [], {})
    info["fwd_schedule"] = {"wan": "free", "hunyuan": "ping-pong"}
    assert "Gluon forward schedule: wan free, hunyuan ping-pong" in bench.build_markdown(info, [], {}, [], {})


def test_sustain_runs_the_call_for_the_given_time_and_resets_grads(bench, monkeypatch):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    t = torch.zeros(1, requires_grad=True)
    calls = []

    def call():
        calls.append(t.grad)
        t.grad = torch.ones(1)

    def fake_clock():  # one second per reading, starting at 0: the call count is exact
        clock = iter(range(1000))
        monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))

    fake_clock()
    assert bench.sustain(call, 0.0) == 0 and not calls
    fake_clock()
    assert bench.sustain(call, 5, (t,)) == len(calls) == 4  # start at 0; readings 1..4 are under 5 s
    assert all(g is None for g in calls)  # every call starts without accumulated gradients


def test_sustain_and_name_options(bench):
    args = bench.parse_args([])
    assert args.sustain == 0.0 and args.name == "kernels"
    args = bench.parse_args(["--sustain", "2", "--name", "kernels_steady"])
    assert args.sustain == 2.0 and args.name == "kernels_steady"
    for bad in (["--sustain", "-1"], ["--name", "../x"], ["--name", ""]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    info = dict(gpu="H200", date="d", torch="t", triton="tr", cuda="c", cudnn=1, rounds=2, sustain_s=2.0)
    assert "back to back for 2 s" in bench.build_markdown(info, [], {}, [], {})
    info["sustain_s"] = 0.0
    assert "back to back" not in bench.build_markdown(info, [], {}, [], {})


def _payload(shape, date, **env):
    base = dict(gpu="H200", torch="t", triton="tr", cuda="c", cudnn=1, rounds=2, sustain_s=3.0, date=date,
                fwd_kernel="hopper", dkdv_kernel="hopper", dq_kernel="hopper", fwd_schedule={shape: "free"})
    row = dict(shape=shape, mode="fwd", provider="ours", density=0.1, ms=1.0, tflops=500.0, speedup_vs_cudnn=9.0,
               ratio_vs_flex=1.3, rate_vs_cudnn=0.95)
    return dict(env=dict(base, **env), args=dict(shapes=[shape]), rows=[row], checks={f"{shape}@0.1": {"o": 1e-3}},
                tune=[], best_configs={}, elapsed_s=1.0)


def test_merge_joins_runs_of_different_shapes(bench, tmp_path):
    import json

    paths = []
    for shape, date in (("wan", "d1"), ("hunyuan", "d2")):
        paths.append(tmp_path / f"{shape}.json")
        paths[-1].write_text(json.dumps(_payload(shape, date)))
    bench.main(["--merge", *map(str, paths), "--out", str(tmp_path), "--name", "both"])
    merged = json.loads((tmp_path / "both.json").read_text())
    assert [r["shape"] for r in merged["rows"]] == ["wan", "hunyuan"]
    assert set(merged["checks"]) == {"wan@0.1", "hunyuan@0.1"} and merged["args"]["shapes"] == ["wan", "hunyuan"]
    md = (tmp_path / "both.md").read_text()
    assert "date: d1; d2" in md and "merged from 2 runs" in md and "wan free, hunyuan free" in md


def test_merge_names_a_date_shared_by_runs_once(bench):
    merged = bench.merge_reports([_payload("wan", "d1"), _payload("hunyuan", "d1")])
    assert merged["env"]["date"] == "d1" and merged["env"]["merged_from"] == 2


@pytest.mark.parametrize("second, match", [
    (_payload("wan", "d2"), "share a shape"),
    (_payload("hunyuan", "d2", sustain_s=0.0), "sustain_s"),
    (_payload("hunyuan", "d2", gpu="H100"), "gpu"),
])
def test_merge_refuses_runs_that_do_not_fit(bench, second, match):
    with pytest.raises(ValueError, match=match):
        bench.merge_reports([_payload("wan", "d1"), second])
    with pytest.raises(ValueError, match="at least two"):
        bench.merge_reports([_payload("wan", "d1")])


def test_merge_of_a_missing_file_exits_with_a_message(bench, tmp_path):
    with pytest.raises(SystemExit, match="--merge"):
        bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written
