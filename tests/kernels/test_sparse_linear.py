"""Tests of sparse-linear attention (SLA): the Triton kernels (CPU interpreter) and the PyTorch backend,
both outputs and dq / dk / dv, against the dense masked reference in fp64; input validation."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse import BlockLayout
from dit_sparse.kernels.sparse_linear import (
    sparse_linear_attention,
    sparse_linear_attention_ref,
    sparse_linear_attention_torch,
)

from _hopper_helpers import SMEM_LIMIT, triton_sm90_smem
from _tolerances import assert_close, tol32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="no GPU and no interpreter")
FEATURE_MAPS = ("softmax", "elu", "relu")

# (forward, gradient) relative RMS tolerances against fp64
TOL = {torch.float32: (tol32(1e-5), tol32(1e-4)), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


# --------------------------------------------------------------------------------------------- helpers
def edge_layout(b, h, q_len, kv_len, block_q, block_kv, density, seed) -> BlockLayout:
    """Random blocks kept with probability ``density``; then query block 0 keeps every key block, block 1
    exactly one and block 2 none (where they exist), so every kind of row is in every test."""
    mq, mk = math.ceil(q_len / block_q), math.ceil(kv_len / block_kv)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, mq, mk, generator=g) < density
    mask[..., 0, :] = True
    if mq > 1:
        mask[..., 1, :] = False
        mask[..., 1, (seed % mk)] = True
    if mq > 2:
        mask[..., 2, :] = False
    return BlockLayout.from_block_mask_tensor(mask, q_len, kv_len, block_q, block_kv)


def make_inputs(b, h, q_len, kv_len, d, dtype, seed, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (magnitude * torch.randn(b, h, s, d, generator=g) for s in (q_len, kv_len, kv_len))
    do_s, do_l = (torch.randn(b, h, q_len, d, generator=g) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q, k, v, do_s, do_l)]


def outputs_and_grads(fn, q, k, v, do_s, do_l):
    """``(o_sparse, o_linear, dq, dk, dv)`` of ``fn(q, k, v)`` for the loss ``<o_s, do_s> + <o_l, do_l>``."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o_s, o_l = fn(q, k, v)
    torch.autograd.backward((o_s, o_l), (do_s.to(o_s.dtype), do_l.to(o_l.dtype)))
    return o_s.detach(), o_l.detach(), q.grad, k.grad, v.grad


def check_against_reference(q, k, v, do_s, do_l, layout, feature_map, backend, scale=None):
    fwd_tol, grad_tol = TOL[q.dtype]
    got = outputs_and_grads(
        lambda a, b, c: sparse_linear_attention(a, b, c, layout, feature_map=feature_map, scale=scale,
                                                backend=backend),
        q, k, v, do_s, do_l,
    )
    ref = outputs_and_grads(
        lambda a, b, c: sparse_linear_attention_ref(a, b, c, layout.to(a.device), feature_map, scale),
        q.double(), k.double(), v.double(), do_s.double(), do_l.double(),
    )
    tols = (fwd_tol,) * 2 + (grad_tol,) * 3
    # gradients that are 0 in exact arithmetic (a single key: P = 1, O = V, dS = dO.V - dO.O) are rounding
    # residue in TF32: measured against the sparse output's scale, which sets dP's
    floor = ref[0].pow(2).mean().sqrt().item() if ref[0].numel() else 0.0
    for name, r, a, tol in zip(("o_sparse", "o_linear", "dq", "dk", "dv"), ref, got, tols):
        assert a.dtype == q.dtype, f"{name}: dtype {a.dtype} != {q.dtype}"
        assert_close(f"{backend}/{feature_map}/{name}", r, a, tol, floor=floor if name[0] == "d" else 0.0)
    return got


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` / ``empty_like`` filled with NaN, so a tile the kernels never write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))


# --------------------------------------------------------------------------------------------- Triton
@needs_triton
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                  HealthCheck.function_scoped_fixture])
@given(
    batch_heads=st.sampled_from([(1, 1), (2, 1), (1, 2)]),
    lens=st.tuples(st.integers(1, 200), st.integers(1, 200)),
    same_len=st.booleans(),
    d=st.sampled_from([64, 96, 128]),
    blocks=st.tuples(st.sampled_from([64, 128]), st.sampled_from([64, 128])),
    density=st.sampled_from([0.0, 0.4, 1.0]),
    broadcast=st.booleans(),
    feature_map=st.sampled_from(FEATURE_MAPS),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(nan_empty, batch_heads, lens, same_len, d, blocks, density, broadcast,
                                  feature_map, seed):
    b, h = batch_heads
    q_len, kv_len = (lens[0], lens[0]) if same_len else lens
    lb, lh = (1, 1) if broadcast else (b, h)
    layout = edge_layout(lb, lh, q_len, kv_len, *blocks, density, seed).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(b, h, q_len, kv_len, d, torch.float32, seed)
    check_against_reference(q, k, v, do_s, do_l, layout, feature_map, "triton")


@needs_triton
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_triton_edge_rows(nan_empty, feature_map):
    """All-critical, one-critical and no-critical query blocks, tail blocks, two heads, custom scale."""
    layout = edge_layout(1, 2, 150, 150, 64, 64, 0.5, seed=3).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(1, 2, 150, 150, 64, torch.float32, seed=3)
    o_s, o_l, *_ = check_against_reference(q, k, v, do_s, do_l, layout, feature_map, "triton", scale=0.3)
    assert torch.count_nonzero(o_l[:, :, :64]) == 0, "an all-critical query block must have o_linear == 0"
    assert torch.count_nonzero(o_s[:, :, 128:]) == 0, "a query block with no critical block must have o_sparse == 0"
    assert torch.count_nonzero(o_l[:, :, 128:]) > 0


@needs_triton
def test_triton_fp32_key_blocks_of_128_rows():
    """fp32 key blocks of 128 rows: the linear dk / dv kernel runs them as two 64-row programs that share the
    block's dH_j / dz_j (a tail block of 44 rows included)."""
    layout = edge_layout(1, 2, 140, 300, 64, 128, 0.4, seed=5).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(1, 2, 140, 300, 64, torch.float32, seed=5)
    check_against_reference(q, k, v, do_s, do_l, layout, "elu", "triton")


@needs_triton
def test_triton_fp16():
    layout = edge_layout(1, 2, 190, 190, 64, 128, 0.5, seed=11).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(1, 2, 190, 190, 64, torch.float16, seed=11)
    check_against_reference(q, k, v, do_s, do_l, layout, "softmax", "triton")


@needs_triton
def test_complement_states_subtracts_the_listed_blocks():
    """Per row, the total minus the states it lists: entries past a row's count are never read, a row that
    lists every block gives exactly 0, and broadcast (stride-0) layout views work."""
    from dit_sparse.kernels.sparse_linear.triton_state import complement_states

    b, h, m_out, m_src = 2, 3, 5, 4
    g = torch.Generator().manual_seed(0)
    states = torch.randn(b * h, m_src, 2, 3, generator=g).to(DEVICE)
    counts = torch.tensor([2, 0, 4, 1, 3], dtype=torch.int32)
    indices = torch.stack([torch.randperm(m_src, generator=g) for _ in range(m_out)]).to(torch.int32)
    indices[1] = -1  # never read: past the count
    counts, indices = counts.to(DEVICE).expand(b, h, m_out), indices.to(DEVICE).expand(b, h, m_out, m_src)
    out = complement_states(states.sum(1), states, counts, indices, torch.float32)
    assert out.shape == (b * h, m_out, 2, 3) and out.dtype == torch.float32
    for i in range(m_out):
        keep = [j for j in range(m_src) if j not in indices[0, 0, i, : counts[0, 0, i]].tolist()]
        torch.testing.assert_close(out[:, i], states[:, keep].sum(1), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[:, 2]) == 0, "a row listing every block must give exactly 0"


@needs_triton
@pytest.mark.parametrize("feature_map", [0, 1])
def test_linear_output_launch_matches_the_fused_epilogue(feature_map):
    """The linear branch in a launch of its own (the Hopper split of ``sla_forward``) writes the same
    output as the ``LINEAR`` epilogue of the block-sparse launch, tail rows and a strided q included."""
    from dit_sparse.kernels.block_sparse.triton_fwd import LinearBranch, block_sparse_fwd
    from dit_sparse.kernels.sparse_linear.triton_fwd import linear_output, linear_states

    layout = edge_layout(2, 2, 200, 150, 64, 64, 0.4, seed=5).to(DEVICE)
    q, k, v, _, _ = make_inputs(2, 2, 200, 150, 32, torch.float32, seed=5)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # a [B, S, H, D] buffer seen as [B, H, S, D]
    counts, indices = layout.kv_counts.expand(2, 2, -1), layout.kv_indices.expand(2, 2, -1, -1)
    r, z = linear_states(k, v, counts, indices, 64, feature_map)
    fused = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_sparse_fwd(q, k, v, counts, indices, 32 ** -0.5, 64, 64,
                     linear=LinearBranch(r, z, fused, feature_map, 1e-6))
    alone = torch.full_like(fused, float("nan"))
    out = linear_output(q, LinearBranch(r, z, alone, feature_map, 1e-6), 64)
    assert out is alone
    torch.testing.assert_close(alone, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_large_inputs_stay_finite(backend, feature_map):
    """fp16 inputs of magnitude ~100: saturated softmax scores, huge elu / relu features."""
    layout = edge_layout(1, 1, 130, 130, 64, 64, 0.3, seed=5).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(1, 1, 130, 130, 64, torch.float16, seed=5, magnitude=100.0)
    def run(a, b, c):
        return sparse_linear_attention(a, b, c, layout, feature_map=feature_map, backend=backend)

    for name, t in zip(("o_sparse", "o_linear", "dq", "dk", "dv"), outputs_and_grads(run, q, k, v, do_s, do_l)):
        assert torch.isfinite(t).all(), f"{backend}/{feature_map}: {name} has NaN or inf"


@needs_triton
def test_custom_op_registration():
    """Schema, fake (meta) kernel and autograd registration of the custom op (what torch.compile needs)."""
    import dit_sparse.kernels.sparse_linear.op  # noqa: F401  (registers the ops)

    layout = edge_layout(1, 1, 64, 64, 64, 64, 1.0, seed=0).to(DEVICE)
    q, k, v, *_ = make_inputs(1, 1, 64, 64, 64, torch.float32, seed=0)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), layout.kv_counts, layout.kv_indices,
            64, 64, "elu", 0.125, 1e-6)
    torch.library.opcheck(torch.ops.dit_sparse.sla_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_triton
def test_eager_path_skips_the_custom_op_and_matches_compiled(monkeypatch):
    """Eager calls run the kernels through a plain autograd.Function (the custom op's dispatch costs more host
    time than the launches); compiled calls run the custom op. Same outputs and gradients; only o_linear
    used (o_sparse's gradient left unset) works too."""
    from dit_sparse.kernels.sparse_linear import op

    layout = edge_layout(1, 2, 100, 100, 64, 64, 0.5, seed=9).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(1, 2, 100, 100, 64, torch.float32, seed=9)

    def run(a, b, c):
        return sparse_linear_attention(a, b, c, layout, feature_map="elu", backend="triton")

    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(run, fullgraph=True, backend="aot_eager"), q, k, v, do_s, do_l)

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op ran in eager mode")

    monkeypatch.setattr(op, "sla_forward_op", refuse)
    monkeypatch.setattr(op, "sla_backward_op", refuse)
    eager = outputs_and_grads(run, q, k, v, do_s, do_l)
    for name, c, e in zip(("o_sparse", "o_linear", "dq", "dk", "dv"), compiled, eager):
        assert_close(f"eager vs compiled {name}", c, e, 1e-6)
    only_linear = outputs_and_grads(run, q, k, v, torch.zeros_like(do_s), do_l)
    a, b, c = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    (run(a, b, c)[1] * do_l).sum().backward()
    for name, want, got in zip(("dq", "dk", "dv"), only_linear[2:], (a.grad, b.grad, c.grad)):
        assert_close(f"o_linear-only {name}", want, got, 1e-6)


# --------------------------------------------------------------------------------------------- torch backend
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    q_len=st.integers(1, 120),
    kv_len=st.integers(1, 120),
    d=st.sampled_from([8, 16, 64]),
    blocks=st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64])),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    feature_map=st.sampled_from(FEATURE_MAPS),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_reference(b, h, q_len, kv_len, d, blocks, density, feature_map, seed):
    layout = edge_layout(b, 1, q_len, kv_len, *blocks, density, seed).to(DEVICE)
    q, k, v, do_s, do_l = make_inputs(b, h, q_len, kv_len, d, torch.float32, seed)
    check_against_reference(q, k, v, do_s, do_l, layout, feature_map, "torch")


def test_auto_backend_on_cpu_is_torch():
    layout = edge_layout(1, 1, 100, 100, 32, 32, 0.5, seed=1)
    q, k, v, *_ = (t.cpu() for t in make_inputs(1, 1, 100, 100, 16, torch.float32, seed=1))
    auto = sparse_linear_attention(q, k, v, layout, backend="auto")
    plain = sparse_linear_attention_torch(q, k, v, layout)
    for a, p in zip(auto, plain):
        torch.testing.assert_close(a, p, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- validation
def _good():
    q = torch.randn(1, 2, 100, 64)
    layout = edge_layout(1, 2, 100, 100, 64, 64, 0.5, seed=0)
    return q, q.clone(), q.clone(), layout


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v, lay, kw: (q[0], k, v, lay, kw), "4-D tensor"),
        (lambda q, k, v, lay, kw: (q.half(), k, v, lay, kw), "share one dtype"),
        (lambda q, k, v, lay, kw: (q.double(), k.double(), v.double(), lay, kw), "share one dtype"),
        (lambda q, k, v, lay, kw: (q, k, v[..., :32], lay, kw), "same shape"),
        (lambda q, k, v, lay, kw: (q[:, :1], k, v, lay, kw), "agree in batch, heads and head dim"),
        (lambda q, k, v, lay, kw: (q, k, v, lay.to_block_mask_tensor(), kw), "BlockLayout"),
        (lambda q, k, v, lay, kw: (q[:, :, :90], k, v, lay, kw), "build the layout for these lengths"),
        (lambda q, k, v, lay, kw: (q, k, v, edge_layout(1, 3, 100, 100, 64, 64, 0.5, 0), kw), "does not broadcast"),
        (lambda q, k, v, lay, kw: (q, k, v, lay, dict(kw, feature_map="cos")), "feature_map 'cos'"),
        (lambda q, k, v, lay, kw: (q, k, v, lay, dict(kw, backend="cuda")), "backend 'cuda'"),
        (lambda q, k, v, lay, kw: (q, k, v, lay, dict(kw, scale=-1.0)), "positive finite"),
        (lambda q, k, v, lay, kw: (q, k, v, BlockLayout(lay.kv_counts.float(), lay.kv_indices, 100, 100, 64, 64), kw),
         "integer tensor"),
    ],
)
def test_invalid_inputs_raise(change, match):
    q, k, v, layout, kw = change(*_good(), {})
    with pytest.raises(ValueError, match=match):
        sparse_linear_attention(q, k, v, layout, **kw)


def test_triton_only_limits_raise():
    q, k, v, layout = _good()
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        sparse_linear_attention(q[..., :48], k[..., :48], v[..., :48], layout, backend="triton")
    small = edge_layout(1, 2, 100, 100, 32, 32, 0.5, 0)
    with pytest.raises(ValueError, match="block_q=32 is not supported"):
        sparse_linear_attention(q, k, v, small, backend="triton")


@pytest.mark.parametrize("head_dim, block", [(96, 128), (128, 64)])
def test_fp32_kernels_compiled_for_sm90_fit(head_dim, block):
    """Every kernel of the SLA forward and backward with fp32 inputs, compiled for sm_90 without a GPU, asks
    for at most the H100 / H200's 227 KB of shared memory. On the H200 the linear dk / dv kernel asked for
    256 KB at head dim 96 with 128-row blocks (fp32 tile and [D, D] state); it now takes 64 rows per
    program there."""
    out = triton_sm90_smem("sla", "float32", head_dim, block, SMEM_LIMIT)
    names = {name.split()[0] for name in out}
    assert names == {"fwd", "dkdv", "dq", "_linear_output_kernel", "_block_state_kernel", "_complement_kernel",
                     "_sla_lin_dq_kernel", "_sla_lin_dkdv_kernel"}, names
    assert all(v <= SMEM_LIMIT for v in out.values()), {k: v for k, v in out.items() if v > SMEM_LIMIT}


def test_linear_dkdv_rows_split_fp32_blocks_only():
    from dit_sparse.kernels.sparse_linear.triton_bwd import dkdv_rows

    assert [dkdv_rows(b, 4) for b in (64, 128)] == [64, 64]
    assert [dkdv_rows(b, 2) for b in (64, 128)] == [64, 128]


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, layout = _good()
    with pytest.raises(ValueError, match="backend='torch' on CPU"):
        sparse_linear_attention(q, k, v, layout, backend="triton")


def test_state_mma_takes_bf16_operands_only_for_unweighted_bf16_inputs():
    # bf16 operands (GPU only; the interpreter's bf16 dot is wrong) for the forward's K / V states; the
    # backward's weighted dO / den and fp16 / fp32 inputs keep the fp32 MMA.
    from dit_sparse.kernels.sparse_linear.triton_state import lowp_dot

    assert lowp_dot(torch.zeros(1, dtype=torch.bfloat16), has_weights=False)
    assert not lowp_dot(torch.zeros(1, dtype=torch.bfloat16), has_weights=True)
    for dtype in (torch.float16, torch.float32):
        assert not lowp_dot(torch.zeros(1, dtype=dtype), has_weights=False)
