"""The warp-specialised Hopper forward (``kernels/block_sparse/hopper_fwd.py``).

Without a GPU: which inputs it takes (everything else must go to the Triton kernel), and that it compiles
for sm_90 through ptxas - shared memory within the H100/H200 limit, no register spills - for the launch
arguments the launcher builds (tail and even key lengths, free and ping-pong schedules, a ``[B, S, H, D]`` buffer seen
as ``[B, H, S, D]``, broadcast layouts). On a Hopper GPU: its output and log-sum-exp against the dense
reference, and through the public API (which picks it) with gradients from the Triton backward.
"""

from __future__ import annotations

import pytest
import torch

from dit_sparse.block_layout import BlockLayout
from dit_sparse.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from dit_sparse.kernels.block_sparse import hopper_fwd
from dit_sparse.kernels.block_sparse.layout_ops import work_order

from _hopper_helpers import SMEM_LIMIT, compile_for_sm90, needs_gluon, needs_hopper
from _hopper_helpers import qkv as _qkv, random_keep


@needs_gluon
def test_supported_inputs(no_interpreter, monkeypatch):
    q, k, v = _qkv(1, 2, 300, 260)
    ok = dict(block_q=128, block_kv=128, capability=(9, 0))
    assert hopper_fwd.hopper_fwd_supported(q, k, v, **ok)
    assert hopper_fwd.hopper_fwd_supported(*_qkv(2, 3, 200, 200, bshd=True), **ok)
    assert hopper_fwd.hopper_fwd_supported(*_qkv(1, 2, 64, 64, dtype=torch.float16), **ok)
    # everything below goes to the Triton kernel
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, block_q=128, block_kv=128, capability=(8, 0))
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, block_q=128, block_kv=128, capability=(10, 0))
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, block_q=64, block_kv=128, capability=(9, 0))
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, block_q=128, block_kv=64, capability=(9, 0))
    assert not hopper_fwd.hopper_fwd_supported(*_qkv(1, 2, 300, 260, D=64), **ok)
    assert not hopper_fwd.hopper_fwd_supported(*_qkv(1, 2, 300, 260, dtype=torch.float32), **ok)
    assert not hopper_fwd.hopper_fwd_supported(*_qkv(1, 2, 300, 0), **ok)
    assert not hopper_fwd.hopper_fwd_supported(*_qkv(1, 2, 0, 260), **ok)
    odd = torch.randn(1, 2, 300, 129, dtype=torch.bfloat16)[..., 1:]  # base and row stride not 16-byte aligned
    assert not hopper_fwd.hopper_fwd_supported(odd, k, v, **ok)
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, block_q=128, block_kv=128)  # CPU tensors
    monkeypatch.setenv("DIT_SPARSE_HOPPER_FWD", "0")
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, **ok)
    monkeypatch.setenv("DIT_SPARSE_HOPPER_FWD", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not hopper_fwd.hopper_fwd_supported(q, k, v, **ok)


@needs_gluon
@pytest.mark.parametrize("rows", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tma_descriptor_uses_gluon_default_layout(rows, dtype):
    """The descriptors reuse one cached shared-memory layout per (rows, dtype); it must be Gluon's own."""
    from triton.experimental.gluon import language as gl

    from dit_sparse.kernels.block_sparse._hopper_common import tma_descriptor

    t = torch.empty(2, 3, 300, 128, dtype=dtype)
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    want = gl.NVMMASharedLayout.get_default_for([1, 1, rows, 128], gl_dtype)
    for _ in range(2):  # computed, then cached
        desc = tma_descriptor(t, rows)
        assert desc.layout == want and desc.block_shape == [1, 1, rows, 128]


@needs_gluon
@pytest.mark.parametrize("kernel, skv, bshd, dtype", [
    ("fwd-pingpong", 1000, True, torch.bfloat16),
    ("fwd", 1024, False, torch.float16),
])
def test_compiles_for_sm90_within_limits(kernel, skv, bshd, dtype):
    info = compile_for_sm90(kernel, hopper_fwd.NUM_STAGES, skv, bshd, dtype)
    assert info["shared"] <= SMEM_LIMIT
    assert info["wgmma"] >= 4  # Q K^T and P V of both consumers
    assert info["setmaxnreg"]  # the producer hands its registers to the consumers
    assert info["spill_bytes"] == 0


def _random_layout(B, H, mq, mk, density, seed, shuffle):
    keep = random_keep(B, H, mq, mk, density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    counts = keep.sum(-1).to(torch.int32)
    order = torch.rand(B, H, mq, mk, generator=g) if shuffle else torch.arange(mk).float().expand(B, H, mq, mk)
    order = torch.where(keep, order, order + 2 * mk)  # kept blocks first, in random or ascending order
    idx = order.argsort(-1).to(torch.int32)
    return counts, idx, keep


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S, Skv, bshd, shuffle", [(1000, 1000, True, True), (1024, 700, False, False),
                                                   (300, 1280, True, False)])
def test_matches_reference_on_hopper(dtype, S, Skv, bshd, shuffle):
    B, H = 2, 3
    q, k, v = _qkv(B, H, S, Skv, dtype=dtype, device="cuda", bshd=bshd)
    mq, mk = -(-S // 128), -(-Skv // 128)
    counts, idx, keep = _random_layout(B, H, mq, mk, 0.4, seed=S + Skv, shuffle=shuffle)
    scale = 128 ** -0.5
    o, lse = hopper_fwd.hopper_block_sparse_fwd(q, k, v, counts.cuda(), idx.cuda(), scale)
    # the project's dense reference, from the boolean block mask (not from the shuffled index lists)
    ref_o, ref_lse = block_sparse_attention_reference(
        q, k, v, BlockLayout.from_block_mask_tensor(keep.cuda(), S, Skv), scale, return_lse=True)
    assert o.stride() == q.stride()
    assert torch.isfinite(o).all()
    err = (o.float() - ref_o).pow(2).mean().sqrt() / ref_o.pow(2).mean().sqrt()
    assert err < 1e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 2e-2
    assert (o[:, :, :128] == 0).all()  # query block 0 keeps nothing


@needs_hopper
@pytest.mark.parametrize("S, Skv", [(1000, 1000), (300, 1280)])
def test_pingpong_schedule_is_bit_identical(S, Skv):
    """Taking turns changes when each warpgroup issues its MMAs, not which or in what order."""
    B, H = 2, 3
    q, k, v = _qkv(B, H, S, Skv, dtype=torch.bfloat16, device="cuda")
    counts, idx, _ = _random_layout(B, H, -(-S // 128), -(-Skv // 128), 0.5, seed=S, shuffle=True)
    counts, idx = counts.cuda(), idx.cuda()
    runs = []
    for pingpong in (False, True):
        o, lse = hopper_fwd.new_output(q), torch.empty(B, H, S, device="cuda")
        grid, args, kwargs = hopper_fwd.kernel_launch(q, k, v, o, lse, counts, idx, 0.09, pingpong=pingpong)
        hopper_fwd._hopper_fwd_kernel[grid](*args, **kwargs)
        runs.append((o, lse))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.isfinite(runs[0][0]).all()


@needs_hopper
def test_launch_order_changes_nothing_but_the_order():
    """Query blocks taken longest list first (the default) or in natural order: bit-identical results."""
    B, H, S = 2, 3, 1300
    q, k, v = _qkv(B, H, S, S, device="cuda")
    m = -(-S // 128)
    keep = random_keep(B, H, m, m, 0.2, seed=7)
    keep[..., 5, :] = True  # one query block keeps every key block
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, S)
    natural = torch.arange(m, dtype=torch.int32, device="cuda").expand(B, H, m).contiguous()
    assert not torch.equal(work_order(layout.kv_counts), natural)
    runs = []
    for order in (None, natural):
        o, lse = hopper_fwd.new_output(q), torch.empty(B, H, S, device="cuda")
        grid, args, kwargs = hopper_fwd.kernel_launch(q, k, v, o, lse, layout.kv_counts, layout.kv_indices, 0.09,
                                                      order=order)
        hopper_fwd._hopper_fwd_kernel[grid](*args, **kwargs)
        runs.append((o, lse))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.isfinite(runs[0][0]).all() and (runs[0][0][:, :, :128] == 0).all()


@needs_hopper
def test_public_api_uses_it_and_backward_agrees():
    B, H, S = 1, 2, 900
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, S, S, device="cuda", bshd=True))
    keep = torch.rand(B, H, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    keep |= torch.eye(8, dtype=torch.bool)
    layout = BlockLayout.from_block_mask_tensor(keep.cuda(), S, S, 128, 128)
    assert hopper_fwd.hopper_fwd_supported(q, k, v, 128, 128)
    o = block_sparse_attention(q, k, v, layout)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), layout)
    assert (o.float() - ref).abs().max() < 3e-2
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    for got, want in zip(grads, ref_grads):
        err = (got.float() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()
        assert err < 2e-2


def test_pingpong_where_k_and_v_of_a_head_outgrow_half_the_l2():
    """The consumers take turns where K + V of one head exceed half the L2 (as measured on the H200:
    Hunyuan-720p's 60.8 MB per head 7-16% faster with turns, Wan-480p's 16.8 MB not faster)."""
    l2 = 50 * 2**20  # H100 / H200
    wan = torch.empty(1, 12, 32760, 128, dtype=torch.bfloat16, device="meta")
    hunyuan = torch.empty(1, 24, 118800, 128, dtype=torch.bfloat16, device="meta")
    assert not hopper_fwd.pingpong_wanted(wan, l2)
    assert hopper_fwd.pingpong_wanted(hunyuan, l2)
    assert hopper_fwd.pingpong_wanted(wan, 30 * 2**20)  # a smaller L2 (e.g. 40 MB A100 class)
    assert not hopper_fwd.pingpong_wanted(wan[:, :, :16384], 30 * 2**20)
