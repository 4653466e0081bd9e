"""block_scores: Triton kernels (interpreter on CPU) and the PyTorch backend against naive.py, tail blocks,
non-contiguous inputs, outputs fully written, validation and backend dispatch."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.kernels.block_score import block_scores, naive_block_scores
from dit_sparse.kernels.block_score.torch_backend import mean_pool_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton 3.6 interpreter itself warns when a kernel loops over a runtime-int range.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def assert_close(out, ref, rtol):
    """Relative RMS error, as flash-linear-attention's tests measure it (with an absolute floor for
    references that are zero up to rounding, e.g. a single centred key block)."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = float((out.double() - ref.double()).pow(2).mean().sqrt())
    base = float(ref.double().pow(2).mean().sqrt())
    assert err <= rtol * base + 1e-6, f"RMS error {err:.2e} against reference RMS {base:.2e}"


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2), h=st.integers(1, 2), sq=st.integers(1, 70), sk=st.integers(1, 70),
    d=st.sampled_from([8, 16, 24, 64]), bq=st.sampled_from([1, 4, 16, 32]), bkv=st.sampled_from([3, 16, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16]), center=st.booleans(),
)
def test_triton_matches_naive(b, h, sq, sk, d, bq, bkv, dtype, center):
    torch.manual_seed(0)
    q = torch.randn(b, h, sq, d, device=DEVICE).to(dtype)
    k = (torch.randn(b, h, sk, d, device=DEVICE) + 0.5).to(dtype)  # offset: centring matters
    out = block_scores(q, k, bq, bkv, center_keys=center, backend="triton")
    ref = naive_block_scores(q, k, bq, bkv, center_keys=center)
    assert out.shape == (b, h, math.ceil(sq / bq), math.ceil(sk / bkv))
    assert_close(out, ref, 1e-5)


@settings(max_examples=20, deadline=None)
@given(
    sq=st.integers(1, 50), sk=st.integers(1, 50), bq=st.integers(1, 20), bkv=st.integers(1, 20),
    center=st.booleans(), scale=st.sampled_from([None, 0.3]),
)
def test_torch_backend_matches_naive(sq, sk, bq, bkv, center, scale):
    q, k = torch.randn(2, 3, sq, 8), torch.randn(2, 3, sk, 8) + 1.0
    out = block_scores(q, k, bq, bkv, scale=scale, center_keys=center, backend="torch")
    assert_close(out, naive_block_scores(q, k, bq, bkv, scale=scale, center_keys=center), 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tail_block_mean_and_centring_by_hand(backend):
    # One head, head dim 1: q = [1, 2, 3, 4, 5], blocks of 2 -> means 1.5, 3.5, 5 (tail of length 1).
    q = torch.tensor([1.0, 2, 3, 4, 5], device=DEVICE).view(1, 1, 5, 1).expand(1, 1, 5, 16).contiguous()
    k = torch.tensor([0.0, 0, 6], device=DEVICE).view(1, 1, 3, 1).expand(1, 1, 3, 16).contiguous()
    # keys in blocks of 2: means 0 and 6 (tail); mean of all keys 2 -> centred 0-2=-2 and 6-2=4.
    out = block_scores(q, k, 2, 2, scale=1.0, backend=backend)
    expect = torch.tensor([1.5, 3.5, 5.0])[:, None] * torch.tensor([-2.0, 4.0])[None, :] * 16
    assert torch.allclose(out[0, 0].cpu(), expect)
    raw = block_scores(q, k, 2, 2, scale=1.0, center_keys=False, backend=backend)
    assert torch.allclose(raw[0, 0].cpu(), torch.tensor([1.5, 3.5, 5.0])[:, None] * torch.tensor([0.0, 6.0]) * 16)


def test_non_contiguous_inputs():
    # [B, S, H, D] viewed as [B, H, S, D], the layout diffusers processors produce.
    q = torch.randn(2, 37, 3, 16, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 45, 3, 16, device=DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    assert_close(block_scores(q, k, 8, 16, backend="triton"), naive_block_scores(q, k, 8, 16), 1e-5)


def test_every_output_written(monkeypatch):
    """Outputs allocated with torch.empty are NaN-filled first, so an unwritten entry shows up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    q, k = torch.randn(1, 2, 75, 32, device=DEVICE), torch.randn(1, 2, 150, 32, device=DEVICE)
    monkeypatch.setattr(torch, "empty", nan_empty)
    out = block_scores(q, k, 8, 4, backend="triton")
    monkeypatch.undo()
    assert not out.isnan().any()
    assert_close(out, naive_block_scores(q, k, 8, 4), 1e-5)


def test_mean_pool_torch_tail():
    x = torch.arange(7.0).view(1, 1, 7, 1)
    assert mean_pool_torch(x, 3).flatten().tolist() == [1.0, 4.0, 6.0]


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k = torch.randn(1, 1, 8, 16, device=DEVICE), torch.randn(1, 1, 8, 16, device=DEVICE)
    a = block_scores(q, k, 4, 4)
    b = block_scores(q, k, 4, 4, scale=0.25)
    assert torch.allclose(a, b)


@pytest.mark.parametrize(
    "q_shape,k_shape,kwargs,match",
    [
        ((1, 2, 8, 16), (1, 2, 8, 16), dict(block_q=0), "block_q"),
        ((1, 2, 8, 16), (1, 2, 8, 16), dict(block_kv=2.0), "block_kv"),
        ((1, 2, 8, 16), (1, 3, 8, 16), {}, "agree"),
        ((1, 2, 8, 16), (1, 2, 8, 8), {}, "agree"),
        ((2, 8, 16), (2, 8, 16), {}, r"\[B, H, S, D\]"),
        ((1, 2, 8, 16), (1, 2, 8, 16), dict(backend="cuda"), "backend"),
    ],
)
def test_validation(q_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_scores(torch.randn(q_shape), torch.randn(k_shape), **kwargs)


def test_integer_inputs_rejected():
    with pytest.raises(ValueError, match="floating"):
        block_scores(torch.ones(1, 1, 4, 4, dtype=torch.int32), torch.ones(1, 1, 4, 4, dtype=torch.int32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch only")
def test_explicit_triton_on_cpu_without_interpreter_refuses(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="backend='torch'"):
        block_scores(q, q, 4, 4, backend="triton")
    # auto picks the PyTorch path on CPU without the interpreter
    assert_close(block_scores(q, q, 4, 4), naive_block_scores(q, q, 4, 4), 1e-6)
