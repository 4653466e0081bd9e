"""The warp-specialised Hopper backward kernels: dK / dV (``kernels/block_sparse/hopper_dkdv.py``) and dQ
(``hopper_dq.py``).

Without a GPU: which inputs they take, that they compile for sm_90 through ptxas (shared memory within the
H100/H200 limit, no register spills) for the launch arguments their launchers build, and that the backward
launcher hands them exactly their jobs (delta, lse, the forward or transposed layout) when they apply. On a
Hopper GPU: dK / dV / dQ against the dense fp32 reference's gradients (tails, an empty query block, a key
block no query attends to, shuffled index lists, scores far below the log-sum-exp, ``[B, S, H, D]`` strides,
batch-broadcast layouts, NaN-prefilled outputs), and the public API's gradients with them against those of
the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch

from dit_sparse.block_layout import BlockLayout
from dit_sparse.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from dit_sparse.kernels.block_sparse import _common, hopper_dkdv, hopper_dq, triton_bwd
from dit_sparse.kernels.block_sparse._hopper_common import hopper_bwd_supported
from dit_sparse.kernels.block_sparse.layout_ops import transpose_layout_tensors, work_order

from _hopper_helpers import SMEM_LIMIT, compile_for_sm90, needs_gluon, needs_hopper
from _hopper_helpers import qkv, random_keep


@needs_gluon
def test_supported_inputs(no_interpreter, monkeypatch):
    q, k, v, do = qkv(1, 2, 300, 260, n=4)
    ok = dict(block_q=128, block_kv=128, capability=(9, 0))
    supported = hopper_bwd_supported  # the dK/dV and the dQ kernel take the same inputs
    assert supported(q, k, v, do, **ok)
    assert supported(*qkv(2, 3, 200, 200, bshd=True, n=4), **ok)
    assert supported(*qkv(1, 2, 64, 64, dtype=torch.float16, n=4), **ok)
    # everything below goes to the Triton dK / dV kernel
    assert not supported(q, k, v, do, block_q=128, block_kv=128, capability=(8, 0))
    assert not supported(q, k, v, do, block_q=64, block_kv=128, capability=(9, 0))
    assert not supported(q, k, v, do, block_q=128, block_kv=64, capability=(9, 0))
    assert not supported(*qkv(1, 2, 300, 260, D=64, n=4), **ok)
    assert not supported(*qkv(1, 2, 300, 260, dtype=torch.float32, n=4), **ok)
    assert not supported(*qkv(1, 2, 300, 0, n=4), **ok)
    odd = torch.randn(1, 2, 300, 129, dtype=torch.bfloat16)[..., 1:]  # base and row stride not 16-byte aligned
    assert not supported(q, k, v, odd, **ok)
    assert not supported(q, k, v, do.half(), **ok)
    # the gradient of (o * w).sum(): w broadcast over B, H, S (strides 0) - TMA cannot step over it
    broadcast = torch.randn(128, dtype=torch.bfloat16).expand_as(do)
    assert not supported(q, k, v, broadcast, **ok)
    assert not supported(q, k, v, do, block_q=128, block_kv=128)  # CPU tensors
    monkeypatch.setenv("DIT_SPARSE_HOPPER_BWD", "0")
    assert not supported(q, k, v, do, **ok)
    monkeypatch.setenv("DIT_SPARSE_HOPPER_BWD", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not supported(q, k, v, do, **ok)


@needs_gluon
@pytest.mark.parametrize("kernel, module, skv, bshd, dtype", [
    ("dkdv", hopper_dkdv, 1000, True, torch.bfloat16),
    ("dkdv", hopper_dkdv, 1024, False, torch.float16),
    ("dq", hopper_dq, 1000, True, torch.bfloat16),
    ("dq", hopper_dq, 1024, False, torch.float16),
    ("dq-given-delta", hopper_dq, 1000, True, torch.bfloat16),
])
def test_compiles_for_sm90_within_limits(kernel, module, skv, bshd, dtype):
    info = compile_for_sm90(kernel, module.NUM_STAGES, skv, bshd, dtype)
    assert info["shared"] <= SMEM_LIMIT
    assert info["wgmma"] >= 6  # S, dP and the gradient MMAs of both consumers
    assert info["setmaxnreg"]  # the producer hands its registers to the consumers
    assert info["spill_bytes"] == 0


def test_backward_launcher_hands_the_hopper_kernels_their_jobs(monkeypatch):
    """On CPU (interpreter): with the Hopper kernels said to apply, ``block_sparse_bwd`` runs the dQ kernel
    first with the forward's o / lse / dLSE and layout and an empty delta buffer (the kernel computes
    delta), then hands the dK/dV kernel that same buffer, the lse and the transposed layout, and returns their
    outputs; no preprocess runs. A given ``dkdv_config`` / ``dq_config`` keeps the Triton kernel."""
    if not _common.interpreting():
        pytest.skip("checks the dispatch with the CPU interpreter")
    B, H, S, D = 1, 2, 200, 64
    q, k, v, do = qkv(B, H, S, S, D=D, dtype=torch.float16, n=4)
    keep = random_keep(B, H, 2, 2, 0.6, seed=4)
    layout = BlockLayout.from_block_mask_tensor(keep, S, S, 128, 128)
    o, lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), layout, return_lse=True)
    o = o.half()
    dlse = torch.randn(B, H, S)
    q_counts, q_indices = transpose_layout_tensors(layout.kv_counts, layout.kv_indices, 2)
    calls = {"dkdv": [], "dq": [], "preprocess": 0}

    def fake_dkdv(*args):
        calls["dkdv"].append(args)
        return torch.full_like(k, 1.5), torch.full_like(v, -2.5)

    def fake_dq(*args, o=None, dlse=None):
        calls["dq"].append((args, o, dlse))
        args[5].fill_(7.0)  # stands for the delta the kernel writes
        return torch.full_like(q, 0.5)

    class CountingPreprocess:
        def __getitem__(self, grid):
            calls["preprocess"] += 1
            return lambda *a, **kw: None

    monkeypatch.setattr(triton_bwd, "hopper_bwd_supported", lambda *a: True)
    monkeypatch.setattr(triton_bwd, "hopper_dkdv", fake_dkdv)
    monkeypatch.setattr(triton_bwd, "hopper_dq", fake_dq)
    real_preprocess = triton_bwd._bwd_preprocess
    monkeypatch.setattr(triton_bwd, "_bwd_preprocess", CountingPreprocess())
    args = (do, dlse, q, k, v, o, lse, layout.kv_counts, layout.kv_indices, q_counts, q_indices, 0.125, 128, 128)
    dq, dk, dv = triton_bwd.block_sparse_bwd(*args)
    assert len(calls["dkdv"]) == len(calls["dq"]) == 1 and calls["preprocess"] == 0
    (cq, ck, cv, cdo, clse, cdelta_q, ckc, cki, cscale), co, cdlse = calls["dq"][0]
    assert cq is q and ck is k and cv is v and cdo is do and clse is lse and cscale == 0.125
    assert ckc is layout.kv_counts and cki is layout.kv_indices and co is o and cdlse is dlse
    assert cdelta_q.shape == (B, H, S) and cdelta_q.dtype == torch.float32 and cdelta_q.is_contiguous()
    (cq, ck, cv, cdo, clse, cdelta, cqc, cqi, cscale) = calls["dkdv"][0]
    assert cq is q and ck is k and cv is v and cdo is do and clse is lse and cscale == 0.125
    assert cqc is q_counts and cqi is q_indices
    assert cdelta is cdelta_q and (cdelta == 7.0).all()  # what the dQ kernel wrote
    assert (dk == 1.5).all() and (dv == -2.5).all() and (dq == 0.5).all()
    monkeypatch.setattr(triton_bwd, "_bwd_preprocess", real_preprocess)
    ref = triton_bwd.block_sparse_bwd(*args, dkdv_config=(128, 128, 4, 1), dq_config=(128, 128, 4, 1))
    assert len(calls["dkdv"]) == len(calls["dq"]) == 1  # the explicit configs kept the Triton kernels
    assert not (ref[0] == 0.5).all() and not (ref[1] == 1.5).all()
    # a given dq_config alone: the Triton dQ, and the preprocess (not the dQ kernel) writes the delta that
    # the Gluon dK/dV gets
    monkeypatch.setattr(triton_bwd, "_bwd_preprocess", CountingPreprocess())
    triton_bwd.block_sparse_bwd(*args, dq_config=(128, 128, 4, 1))
    assert calls["preprocess"] == 1 and len(calls["dq"]) == 1 and len(calls["dkdv"]) == 2


def _reference_grads(q, k, v, do, layout, scale):
    """Dense fp32 reference: o, lse, and dQ / dK / dV of <o, do>."""
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    o, lse = block_sparse_attention_reference(qf, kf, vf, layout, scale, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (qf, kf, vf), do.float())
    return o.detach(), lse.detach(), dq, dk, dv


def _rel(got, want):
    return ((got.float() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def _nan_outputs(monkeypatch):
    for module in (hopper_dkdv, hopper_dq):
        monkeypatch.setattr(module, "new_output", lambda like: torch.full_like(like, float("nan")))


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S, Skv, bshd, broadcast", [(1000, 1000, True, False), (1024, 700, False, True),
                                                     (900, 1000, True, True)])
def test_matches_reference_on_hopper(monkeypatch, dtype, S, Skv, bshd, broadcast):
    B, H = 2, 3
    q, k, v, do = qkv(B, H, S, Skv, dtype=dtype, device="cuda", bshd=bshd, n=4)
    mq, mk = -(-S // 128), -(-Skv // 128)
    keep = random_keep(1 if broadcast else B, H, mq, mk, 0.4, seed=S + Skv)
    keep[..., :, 2] = False  # a key block no query attends to: its dK / dV are 0
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, Skv)
    scale = 128 ** -0.5
    o, lse, dq_ref, dk_ref, dv_ref = _reference_grads(q, k, v, do, layout.expand(B, H), scale)
    delta = (do.float() * o).sum(-1).contiguous()
    q_counts, q_indices = transpose_layout_tensors(layout.kv_counts, layout.kv_indices, mq)
    _nan_outputs(monkeypatch)
    dk, dv = hopper_dkdv.hopper_dkdv(q, k, v, do, lse.contiguous(), delta, q_counts, q_indices, scale)
    # the forward lists in reverse order: the dQ kernel takes any order (the partial key block first)
    counts, idx = layout.kv_counts, layout.kv_indices
    slots = torch.arange(mk, device="cuda")
    rev = torch.where(slots < counts[..., None], counts[..., None] - 1 - slots, slots)
    rev_idx = idx.gather(-1, rev).contiguous()
    dq = hopper_dq.hopper_dq(q, k, v, do, lse.contiguous(), delta, counts, rev_idx, scale)
    # the launcher's way: the dQ kernel computes delta from o (in the inputs' dtype and layout) and dLSE
    o_low = torch.empty_like(q).copy_(o)
    dlse = torch.randn(B, H, S, device="cuda")
    delta_out = torch.full_like(delta, float("nan"))
    dq_fused = hopper_dq.hopper_dq(q, k, v, do, lse.contiguous(), delta_out, counts, rev_idx, scale, o=o_low,
                                   dlse=dlse)
    torch.cuda.synchronize()
    assert dk.stride() == k.stride() and dv.stride() == v.stride() and dq.stride() == q.stride()
    for name, got, want in (("dk", dk, dk_ref), ("dv", dv, dv_ref), ("dq", dq, dq_ref)):
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) < 2e-2, name
    assert (dk[:, :, 256:384] == 0).all() and (dv[:, :, 256:384] == 0).all()
    assert (dq[:, :, :128] == 0).all()  # query block 0 keeps nothing
    delta_want = (do.float() * o_low.float()).sum(-1) - dlse
    torch.testing.assert_close(delta_out, delta_want, rtol=1e-4, atol=1e-4)
    dq_want = hopper_dq.hopper_dq(q, k, v, do, lse.contiguous(), delta_want.contiguous(), counts, rev_idx, scale)
    assert _rel(dq_fused, dq_want.float()) < 1e-3
    assert (dq_fused[:, :, :128] == 0).all()


@needs_hopper
def test_launch_order_changes_nothing_but_the_order():
    """The CTAs take their blocks longest list first (``layout_ops.work_order``); each block's work is the
    same in any launch order, so dK / dV / dQ are bit-identical to the natural order's."""
    B, H, S = 2, 3, 1300
    q, k, v, do = qkv(B, H, S, S, device="cuda", n=4)
    m = -(-S // 128)
    keep = random_keep(B, H, m, m, 0.2, seed=5)
    keep[..., :, 4] = True  # one key block every query keeps, another none: very different list lengths
    keep[..., :, 6] = False
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, S)
    scale = 128 ** -0.5
    lse = torch.randn(B, H, S, device="cuda").abs() + 3.0
    delta = torch.randn(B, H, S, device="cuda")
    q_counts, q_indices = transpose_layout_tensors(layout.kv_counts, layout.kv_indices, m)
    natural = torch.arange(m, dtype=torch.int32, device="cuda").expand(B, H, m).contiguous()
    assert not torch.equal(work_order(q_counts), natural)
    runs = []
    for order in (None, natural):
        dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
        grid, args, kwargs = hopper_dkdv.kernel_launch(q, k, v, do, lse, delta, dk, dv, q_counts, q_indices, scale,
                                                       order=order)
        hopper_dkdv._hopper_dkdv_kernel[grid](*args, **kwargs)
        grid, args, kwargs = hopper_dq.kernel_launch(q, k, v, do, lse, delta, dq, layout.kv_counts,
                                                     layout.kv_indices, scale, order=order)
        hopper_dq._hopper_dq_kernel[grid](*args, **kwargs)
        runs.append((dk, dv, dq))
    for name, first, second in zip(("dk", "dv", "dq"), *runs):
        assert torch.isfinite(first).all(), name
        assert torch.equal(first, second), name
    assert (runs[0][0][:, :, 6 * 128:7 * 128] == 0).all()


@needs_hopper
def test_dq_with_scores_far_below_the_lse(monkeypatch):
    """Rows whose real scores all lie far below 0 have a very negative lse; the zero-filled key columns
    past Skv (score 0) must not overflow the exponent (the kernel clamps it)."""
    B, H, S, Skv = 1, 2, 384, 700
    q, k, v, do = qkv(B, H, S, Skv, dtype=torch.bfloat16, device="cuda", n=4)
    q, k = q.abs() * 5, -k.abs() * 5  # every q.k < 0: scaled scores near -104, so exp(-lse) overflows fp32
    keep = torch.ones(1, H, 3, 6, dtype=torch.bool)
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, Skv)
    scale = 128 ** -0.5
    o, lse, dq_ref, _, _ = _reference_grads(q, k, v, do, layout.expand(B, H), scale)
    assert lse.max() < -90
    delta = (do.float() * o).sum(-1).contiguous()
    _nan_outputs(monkeypatch)
    dq = hopper_dq.hopper_dq(q, k, v, do, lse.contiguous(), delta, layout.kv_counts, layout.kv_indices, scale)
    torch.cuda.synchronize()
    assert torch.isfinite(dq).all()
    assert _rel(dq, dq_ref) < 2e-2


@needs_hopper
def test_public_api_gradients_match_the_triton_kernels(monkeypatch):
    B, H, S = 1, 2, 900
    q, k, v = (t.requires_grad_() for t in qkv(B, H, S, S, device="cuda", bshd=True))
    keep = random_keep(B, H, 8, 8, 0.5, seed=3) | torch.eye(8, dtype=torch.bool)
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, S, 128, 128)
    g = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16)
    assert hopper_bwd_supported(q, k, v, g, 128, 128)
    grads = torch.autograd.grad(block_sparse_attention(q, k, v, layout), (q, k, v), g)
    monkeypatch.setenv("DIT_SPARSE_HOPPER_BWD", "0")
    triton_grads = torch.autograd.grad(block_sparse_attention(q, k, v, layout), (q, k, v), g)
    for got, want in zip(grads, triton_grads):
        assert _rel(got, want.float()) < 1e-2
    # with a loss on the returned log-sum-exp too (dLSE enters the dQ kernel's delta)
    w = torch.randn(B, H, S, device="cuda")

    def loss_grads():
        o, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
        return torch.autograd.grad((o.float() * g).sum() + (lse * w).sum(), (q, k, v))

    triton_grads = loss_grads()
    monkeypatch.setenv("DIT_SPARSE_HOPPER_BWD", "1")
    for got, want in zip(loss_grads(), triton_grads):
        assert _rel(got, want.float()) < 1e-2


@needs_hopper
def test_forward_and_backward_replay_from_a_cuda_graph():
    """Captured in a CUDA graph, the forward and the backward replay to the eager results. The layout captured
    was never seen eagerly: its work order and transposed layout are made inside the graph and kept out of
    the caches, so an eager call with it before any replay still computes its own (a cached one would hold
    nothing until the graph replays)."""
    B, H, S = 1, 2, 1000
    q, k, v = (t.requires_grad_() for t in qkv(B, H, S, S, device="cuda"))
    g = torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16)

    def make_layout(seed):
        keep = random_keep(B, H, 8, 8, 0.4, seed=seed) | torch.eye(8, dtype=torch.bool)
        keep[..., :, 3] = True  # lists of very different lengths: a non-trivial work order
        return BlockLayout.from_block_mask_tensor(keep.cuda(), S, S, 128, 128)

    def step(layout):  # o detached: a live autograd graph would keep the leaves' nodes on the eager stream
        o = block_sparse_attention(q, k, v, layout)
        return (o.detach(), *torch.autograd.grad(o, (q, k, v), g))

    warm, fresh = make_layout(11), make_layout(12)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(warm)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(fresh)
    eager = step(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(eager[0]).all()
    for got, ref in zip(captured, eager):
        assert torch.equal(got, ref)
    reference = block_sparse_attention_reference(q.float(), k.float(), v.float(), fresh)
    assert _rel(eager[0], reference) < 1e-2
