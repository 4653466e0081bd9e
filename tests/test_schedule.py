"""Tests for dit_sparse.schedule (StepSchedule, StepState) and dit_sparse.step_cache (StepCache)."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.schedule import Decision, StepSchedule, StepState
from dit_sparse.step_cache import StepCache

FAST = settings(max_examples=60, deadline=None)


def modes(schedule, num_steps, layer=1, num_layers=None):
    return [schedule.decide(s, layer, num_steps, num_layers).mode for s in range(num_steps)]


# ---------------------------------------------------------------------------------------------- dense phase
def test_fraction_and_count():
    assert modes(StepSchedule(0.2), 10) == ["dense"] * 2 + ["sparse"] * 8
    assert modes(StepSchedule(0.25), 10) == ["dense"] * 3 + ["sparse"] * 7  # ceil(2.5)
    assert StepSchedule(0.1).dense_step_count(30) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert modes(StepSchedule(3), 5) == ["dense"] * 3 + ["sparse"] * 2
    assert modes(StepSchedule(1.0), 4) == ["dense"] * 4
    assert modes(StepSchedule(1), 4) == ["dense"] + ["sparse"] * 3  # int 1 is a count, not 100%
    assert modes(StepSchedule(0.0), 3) == ["sparse"] * 3
    assert modes(StepSchedule(99), 3) == ["dense"] * 3  # a count above num_steps: all dense
    # num_steps from the constructor, or a count needs none at all
    assert StepSchedule(0.5, num_steps=4).decide(1, 0).mode == "dense"
    assert StepSchedule(2).decide(1000, 0).mode == "sparse"


@FAST
@given(fraction=st.floats(0.0, 1.0), num_steps=st.integers(1, 200))
def test_dense_count_is_ceil_of_fraction(fraction, num_steps):
    count = StepSchedule(fraction).dense_step_count(num_steps)
    exact = Fraction(fraction) * num_steps
    # ceil, except that a product within 1e-9 of an integer counts as that integer
    assert count == (round(exact) if abs(exact - round(exact)) < 1e-9 else math.ceil(exact))
    assert count / num_steps >= fraction - 1e-9 and (count - 1) / num_steps < fraction
    assert modes(StepSchedule(fraction), num_steps) == ["dense"] * count + ["sparse"] * (num_steps - count)


# ---------------------------------------------------------------------------------------------- layers
def test_dense_and_sparse_layers():
    s = StepSchedule(0.0, dense_layers=(0, -1), num_layers=5)
    assert [s.decide(3, layer).mode for layer in range(5)] == ["dense", "sparse", "sparse", "sparse", "dense"]
    s = StepSchedule(0.0, dense_layers=(-2,))
    assert [s.decide(0, layer, num_layers=4).mode for layer in range(4)] == ["sparse"] * 2 + ["dense", "sparse"]
    s = StepSchedule(0, sparse_layers=(1, -1))
    assert [s.decide(0, layer, num_layers=4).mode for layer in range(4)] == ["dense", "sparse", "dense", "sparse"]
    with pytest.raises(ValueError, match="num_layers"):
        StepSchedule(0.0, dense_layers=(-1,)).decide(0, 0)
    assert StepSchedule(0.0, dense_layers=(2,)).decide(0, 2).mode == "dense"  # non-negative: no num_layers


# ---------------------------------------------------------------------------------------------- reuse
def test_reuse_every_output_mode():
    s = StepSchedule(2, reuse_every=3, reuse_mode="output")
    got = [s.decide(i, 0, 10) for i in range(10)]
    assert [d.mode for d in got] == ["dense", "dense", "sparse", "reuse", "reuse", "sparse", "reuse", "reuse",
                                     "sparse", "reuse"]
    assert [i for i, d in enumerate(got) if d.store_output] == [2, 5, 8]
    assert {d.reuse_mode for d in got if d.mode == "reuse"} == {"output"}
    assert not any(d.store_residual for d in got)


def test_reuse_every_residual_mode_refreshes_dense():
    s = StepSchedule(2, reuse_every=3, reuse_mode="residual")
    got = [s.decide(i, 0, 10) for i in range(10)]
    assert [d.mode for d in got] == ["dense", "dense", "dense", "reuse", "reuse", "dense", "reuse", "reuse",
                                     "dense", "reuse"]
    assert [i for i, d in enumerate(got) if d.store_residual] == [2, 5, 8]
    assert not any(d.store_output for d in got)


def test_explicit_reuse_steps():
    s = StepSchedule(0.2, reuse_steps=(2, 3, -1), reuse_mode="residual")
    got = [s.decide(i, 0, 10) for i in range(10)]
    assert [d.mode for d in got] == ["dense", "dense", "reuse", "reuse"] + ["sparse"] * 4 + ["dense", "reuse"]
    assert [i for i, d in enumerate(got) if d.store_residual] == [1, 8]
    out = StepSchedule(0, reuse_steps=(1,), reuse_mode="output")
    assert out.decide(0, 0, 3) == Decision("sparse", store_output=True)
    assert out.decide(2, 0, 3) == Decision("sparse")
    # dense layers never reuse, and a store flag never lands on the last step
    assert StepSchedule(0, reuse_every=2, dense_layers=(0,)).decide(1, 0, 4) == Decision("dense")
    assert StepSchedule(0, reuse_every=2, reuse_mode="output").decide(2, 1, 3) == Decision("sparse")


@FAST
@given(
    dense=st.one_of(st.floats(0.0, 1.0), st.integers(0, 12)),
    num_steps=st.integers(1, 40),
    every=st.integers(1, 5),
    mode=st.sampled_from(["output", "residual"]),
)
def test_reuse_properties(dense, num_steps, every, mode):
    s = StepSchedule(dense, reuse_every=every, reuse_mode=mode)
    n_dense = s.dense_step_count(num_steps)
    got = [s.decide(i, 0, num_steps) for i in range(num_steps)]
    for i, d in enumerate(got):
        assert d.mode in ("dense", "sparse", "reuse")
        if i < n_dense:
            assert d.mode == "dense"  # reuse never happens in the dense phase
        else:
            assert (d.mode == "reuse") == ((i - n_dense) % every != 0)
        if d.mode == "reuse":
            assert d.reuse_mode == mode
            # the run of reuse steps is preceded by a step that stored what it needs
            j = i - 1
            while got[j].mode == "reuse":
                j -= 1
            assert got[j].store_residual if mode == "residual" else got[j].store_output
            assert got[j].mode == "dense" or mode == "output"
        stored = d.store_output or d.store_residual
        assert stored == (d.mode != "reuse" and i + 1 < num_steps and got[i + 1].mode == "reuse")
    # table() agrees with decide()
    assert [row[0] for row in s.table(num_steps, 1)] == [d.mode for d in got]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dense_steps=1.5), r"\[0, 1\]"),
        (dict(dense_steps=-0.1), r"\[0, 1\]"),
        (dict(dense_steps=-2), ">= 0"),
        (dict(dense_steps="0.2"), "fraction"),
        (dict(dense_steps=True), "fraction"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_layers=-3), "num_layers"),
        (dict(dense_layers=(0, 0)), "twice"),
        (dict(dense_layers=(0.5,)), "ints"),
        (dict(dense_layers="01"), "sequence"),
        (dict(dense_layers=(1,), sparse_layers=(1,)), "both"),
        (dict(dense_layers=(-1,), sparse_layers=(3,), num_layers=4), "both"),
        (dict(dense_layers=(5,), num_layers=4), "out of range"),
        (dict(reuse_every=0), "reuse_every"),
        (dict(reuse_every=2, reuse_steps=(3,)), "not both"),
        (dict(reuse_mode="cache"), "reuse_mode"),
        (dict(dense_steps=2, reuse_steps=(1, 5)), "dense phase"),
        (dict(dense_steps=0, reuse_steps=(0,)), "step 0"),
        (dict(dense_steps=0.5, num_steps=10, reuse_steps=(4,)), "dense phase"),
        (dict(dense_steps=0, num_steps=10, reuse_steps=(10,)), "out of range"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepSchedule(**kwargs)


def test_decide_validation():
    s = StepSchedule(0.2)
    with pytest.raises(ValueError, match="num_steps"):
        s.decide(0, 0)  # a fraction needs num_steps
    with pytest.raises(ValueError, match="out of range"):
        s.decide(10, 0, num_steps=10)
    with pytest.raises(ValueError, match="step"):
        s.decide(-1, 0, num_steps=10)
    with pytest.raises(ValueError, match="layer_index"):
        s.decide(0, -1, num_steps=10)
    with pytest.raises(ValueError, match="out of range"):
        s.decide(0, 4, num_steps=10, num_layers=4)
    with pytest.raises(ValueError, match="num_steps"):
        StepSchedule(0, reuse_steps=(-1,)).decide(0, 0)
    with pytest.raises(ValueError, match="dense phase"):
        StepSchedule(0.5, reuse_steps=(3,)).decide(0, 0, num_steps=10)


def test_to_dict_round_trip():
    s = StepSchedule(0.3, num_steps=20, dense_layers=(0, -1), reuse_steps=(15, 12), reuse_mode="output", num_layers=8)
    d = s.to_dict()
    assert d["reuse_steps"] == [12, 15] and d["dense_layers"] == [0, -1]
    back = StepSchedule.from_dict(d)
    assert back == s and back.table(20, 8) == s.table(20, 8)
    assert StepSchedule.from_dict(StepSchedule(3).to_dict()).dense_steps == 3  # the int stays a count
    with pytest.raises(ValueError, match="unknown"):
        StepSchedule.from_dict({"dense_step": 0.2})
    with pytest.raises(ValueError, match="dict"):
        StepSchedule.from_dict([("dense_steps", 0.2)])


# ---------------------------------------------------------------------------------------------- StepState
def test_step_state_counts_distinct_timesteps():
    state = StepState(num_steps=3)
    assert state.timestep is None
    # CFG as two forwards per step: the same timestep twice advances once
    seen = [(state.advance(t), state.branch) for t in (999, 999, 500, 500, 1, 1)]
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert state.timestep == 1
    state.reset()
    assert (state.step, state.branch, state.timestep, state.num_steps) == (0, 0, None, 3)
    assert state.advance(999) == 0  # same first timestep as before: step 0 again after reset


def test_step_state_tensor_timesteps():
    state = StepState()
    t = torch.tensor([800.0, 800.0])  # batched timestep (CFG batched into one forward)
    assert state.advance(t) == 0 and state.advance(t.clone()) == 0 and state.branch == 1
    assert state.advance(torch.tensor([700.0, 700.0])) == 1
    big = torch.linspace(0, 1, 100)  # per-token timesteps: compared by fingerprint
    assert state.advance(big) == 2 and state.advance(big.clone()) == 2
    assert state.advance(big * 0.5) == 3
    assert state.advance(torch.tensor(3)) == 4 and state.advance(3.0) == 4  # value, not type
    with pytest.raises(ValueError):
        state.advance("t")
    with pytest.raises(ValueError):
        state.advance(torch.tensor([]))
    with pytest.raises(ValueError):
        StepState(num_steps=0)


# ---------------------------------------------------------------------------------------------- StepCache
class Attn:
    """Counts dense / sparse attention calls; outputs depend on the step."""

    def __init__(self):
        self.dense_calls = self.sparse_calls = 0
        self.step = 0

    def dense(self):
        self.dense_calls += 1
        return torch.full((2, 3), 10.0 + self.step)

    def sparse(self):
        self.sparse_calls += 1
        return torch.full((2, 3), 7.0 + self.step)


def test_step_cache_output_mode_computes_nothing_on_reuse():
    sched = StepSchedule(1, reuse_every=2, reuse_mode="output")
    cache, attn = StepCache("output"), Attn()
    outs = []
    for step in range(5):
        attn.step = step
        outs.append(cache.run(sched.decide(step, 0, 5), ("l0", 0), step, attn.dense, attn.sparse)[0, 0].item())
    # dense, sparse(1) kept, reuse of step 1, sparse(3) kept, reuse of step 3
    assert outs == [10.0, 8.0, 8.0, 10.0, 10.0]
    assert (attn.dense_calls, attn.sparse_calls) == (1, 2)
    assert len(cache) == 1 and cache.memory_bytes() == 6 * 4


def test_step_cache_residual_mode():
    sched = StepSchedule(2, reuse_every=3, reuse_mode="residual")
    cache, attn = StepCache("residual"), Attn()
    outs = []
    for step in range(5):
        attn.step = step
        outs.append(cache.run(sched.decide(step, 0, 5), "l0", step, attn.dense, attn.sparse)[0, 0].item())
    # steps 0,1 dense; step 2 dense + residual (10+2) - (7+2) = 3; steps 3, 4 sparse + 3
    assert outs == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert (attn.dense_calls, attn.sparse_calls) == (3, 3)


def test_step_cache_branches_reset_and_errors():
    cache = StepCache("output")
    cache.store_output(("l", 0), torch.zeros(2), step=3)
    cache.store_output(("l", 1), torch.ones(2), step=3)
    assert cache.reuse(("l", 1), step=4).sum() == 2 and cache.reuse(("l", 0), step=4).sum() == 0
    with pytest.raises(RuntimeError, match="reset"):
        cache.reuse(("l", 0), step=1)  # a step before the stored one: left over from a previous run
    with pytest.raises(ValueError, match="as is"):
        cache.reuse(("l", 0), torch.ones(2))
    with pytest.raises(ValueError, match="residual"):
        cache.store_residual("l", torch.ones(2), torch.ones(2))
    cache.reset()
    assert len(cache) == 0 and cache.memory_bytes() == 0
    with pytest.raises(RuntimeError, match="nothing kept"):
        cache.reuse(("l", 0))

    res = StepCache()
    assert res.mode == "residual"
    with pytest.raises(ValueError, match="shape"):
        res.store_residual("l", torch.ones(2), torch.ones(3))
    res.store_residual("l", torch.full((2,), 5.0), torch.ones(2))
    assert torch.equal(res.reuse("l", torch.zeros(2, dtype=torch.float16)), torch.full((2,), 4.0, dtype=torch.float16))
    with pytest.raises(ValueError, match="sparse output"):
        res.reuse("l")
    with pytest.raises(ValueError, match="reset"):
        res.reuse("l", torch.zeros(3))
    with pytest.raises(ValueError, match="output"):
        res.store_output("l", torch.ones(2))
    with pytest.raises(ValueError, match="same reuse_mode"):
        res.run(Decision("reuse", reuse_mode="output"), "l", None, torch.ones, torch.ones)
    with pytest.raises(ValueError, match="mode"):
        StepCache("outputs")
