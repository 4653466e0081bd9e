"""kernels/block_score/sampled_mass.py (Triton interpreter on CPU) against SpatioTemporal's PyTorch path
(``_sampled_logits`` then ``_block_softmax_mass``): shapes drawn by hypothesis - tail key blocks, block
sizes that are not powers of two, more rows than one program takes, head dims below the tile, strided
inputs - in fp32 and fp16, and scores large enough that a global-max softmax underflows whole blocks."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse.kernels.block_score.sampled_mass import sampled_block_mass_triton
from dit_sparse.patterns.spatiotemporal import _block_softmax_mass, _sampled_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="no GPU and no interpreter"),
]


def reference(q_rows, k, scale, block):
    return _block_softmax_mass(_sampled_logits(q_rows.double(), k.double(), scale), block).float()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 70), s=st.integers(1, 90),
       d=st.sampled_from([8, 24, 32]), block=st.sampled_from([4, 7, 16, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16]), bshd=st.booleans(), seed=st.integers(0, 99))
def test_matches_the_pytorch_path(b, h, n, s, d, block, dtype, bshd, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype)
    k = k.transpose(1, 2) if bshd else k.transpose(1, 2).contiguous()
    scale = d ** -0.5
    got = sampled_block_mass_triton(q, k, scale, block)
    want = reference(q.float(), k.float(), scale, block)
    assert got.shape == (b, h, n, -(-s // block)) and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got, want.to(got.device), atol=tol, rtol=tol)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, h, n, device=got.device), atol=1e-5, rtol=0)


def test_blocks_far_below_the_row_maximum_keep_their_share():
    # Per-block maxima: a block 80 nats below the best still gets its exact (tiny) share, not 0 / NaN.
    q = torch.ones(1, 1, 1, 16, device=DEVICE)
    k = torch.zeros(1, 1, 32, 16, device=DEVICE)
    k[..., :16, :] = 5.0  # block 0: logit 80 with scale 1; block 1: logit 0
    got = sampled_block_mass_triton(q, k, 1.0, 16)
    assert torch.isfinite(got).all()
    assert float(got[0, 0, 0, 1]) == pytest.approx(float(torch.exp(torch.tensor(-80.0))), rel=1e-4)
