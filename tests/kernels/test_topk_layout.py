"""Fused top-k layout (kernels/block_score/topk_layout.py, Triton interpreter on CPU) against TopK's PyTorch
path (block_scores + select) and naive_topk_layout: both rules, min_blocks, tail blocks, Mk=1 and ~1K key
blocks, exact ties (lower index wins), every slot written, two launches without host sync, validation;
and through the pattern: TopK builds and masks identical with the fused path and the PyTorch one."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse.block_layout import BlockLayout
from dit_sparse.kernels.block_score import block_scores
from dit_sparse.kernels.block_score import topk_layout as fused
from dit_sparse.kernels.block_score.topk_layout import naive_topk_layout, topk_block_mask, topk_layout
from dit_sparse.layout import TokenLayout
from dit_sparse.patterns import PatternContext, Tile3D, TopK

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="no GPU and no interpreter"),
]


# --------------------------------------------------------------------------------------------- helpers
def torch_path(q, k, bq, bkv, **rule):
    """TopK's PyTorch selection (centred fp32 block_scores, then TopK.select) as (counts, indices)."""
    p = TopK(**{n: v for n, v in rule.items() if n != "scale"})
    scores = block_scores(q, k, bq, bkv, scale=rule.get("scale"), backend="torch")
    keep = p.select(scores, k.shape[2], bkv)
    lay = BlockLayout.from_block_mask_tensor(keep, q.shape[2], k.shape[2], bq, bkv)
    return lay.kv_counts, lay.kv_indices


def ref_logits(q, k, bq, bkv, scale=None, threshold_rule=False):
    """fp64 pooled logits [B, H, Mq, Mk] (plus log block length for the threshold rule)."""
    q, k = q.double().cpu(), k.double().cpu()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qp = torch.stack([q[:, :, s: s + bq].mean(2) for s in range(0, q.shape[2], bq)], 2)
    kp = torch.stack([k[:, :, s: s + bkv].mean(2) for s in range(0, k.shape[2], bkv)], 2)
    logits = scale * qp @ kp.transpose(-1, -2)
    if threshold_rule:
        lengths = torch.tensor([min(bkv, k.shape[2] - s) for s in range(0, k.shape[2], bkv)], dtype=torch.float64)
        logits = logits + lengths.log()
    return logits


def assert_well_formed(counts, indices, mk):
    assert counts.dtype == indices.dtype == torch.int32 and indices.shape[-1] == mk
    slots = torch.arange(mk, device=counts.device)
    live = slots < counts[..., None]
    assert ((counts >= 1) & (counts <= mk)).all()
    assert (indices[~live] == 0).all(), "padding slots must be 0"
    assert ((indices >= 0) & (indices < mk)).all()
    ascending = indices[..., 1:] > indices[..., :-1]
    assert (ascending | ~live[..., 1:]).all(), "kept blocks must be strictly ascending"


def assert_same_selection(got, want, logits, n_floor, threshold=None):
    """``got`` equals ``want`` (counts, indices), except in rows where the two differ only by scores that
    tie within fp32 rounding: there ``got`` must still be a correct selection up to a tolerance (its kept
    blocks' scores are the top ones, its count satisfies the rule with masses within the tolerance)."""
    (c, idx), (wc, widx) = got, want
    assert_well_formed(c, idx, logits.shape[-1])
    c, idx, logits = c.cpu().flatten(), idx.cpu().flatten(0, -2), logits.flatten(0, -2)
    diff = (c != wc.cpu().flatten()) | (idx != widx.cpu().flatten(0, -2)).any(-1)
    for r in diff.nonzero().flatten().tolist():
        row, n = logits[r], int(c[r])
        tol = 1e-5 * (1.0 + float(row.abs().max()))
        kept = torch.zeros(row.numel(), dtype=torch.bool)
        kept[idx[r, :n].long()] = True
        dropped_max = float(row[~kept].max()) if n < row.numel() else -math.inf
        assert float(row[kept].min()) >= dropped_max - tol, f"row {r}: kept blocks are not the top-scored ones"
        if threshold is None:
            assert n == n_floor, f"row {r}: kept {n} blocks, rule says {n_floor}"
            continue
        ordered = row.sort(descending=True).values
        p = torch.softmax(ordered, 0)
        mass_before = p.cumsum(0) - p
        assert n >= n_floor
        assert n == n_floor or float(mass_before[n - 1]) < threshold + tol, f"row {r}: kept too many"
        assert n == row.numel() or float(mass_before[n]) >= threshold - tol, f"row {r}: kept too few"


def rule_args(ratio, threshold, min_blocks, mk):
    """(n_floor, threshold or None) as the kernel sees the rule."""
    return fused._keep_rule(mk, ratio, threshold, min_blocks)


# --------------------------------------------------------------------------------------------- kernel vs references
rules = st.one_of(
    st.builds(lambda r: dict(ratio=r), st.floats(0.01, 1.0)),
    st.builds(lambda t: dict(threshold=t), st.one_of(st.floats(0.05, 0.999), st.just(1.0))),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), h=st.integers(1, 2), s=st.integers(1, 60), d=st.sampled_from([8, 16]),
    bq=st.sampled_from([4, 8, 16]), bkv=st.sampled_from([1, 3, 8, 16]), rule=rules, min_blocks=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 1000),
)
def test_fused_matches_topk_torch_path(b, h, s, d, bq, bkv, rule, min_blocks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, h, s, d, generator=g)).to(DEVICE, dtype)
    k = (torch.randn(b, h, s, d, generator=g) + 0.5).to(DEVICE, dtype)  # offset: centring would matter
    got = topk_layout(q, k, bq, bkv, min_blocks=min_blocks, **rule)
    mk = math.ceil(s / bkv)
    assert got[0].shape == (b, h, math.ceil(s / bq)) and got[1].shape == (b, h, math.ceil(s / bq), mk)
    n_floor, thr = rule_args(rule.get("ratio"), rule.get("threshold"), min_blocks, mk)
    logits = ref_logits(q, k, bq, bkv, threshold_rule=thr is not None)
    assert_same_selection(got, torch_path(q, k, bq, bkv, min_blocks=min_blocks, **rule), logits, n_floor, thr)
    assert_same_selection(got, naive_topk_layout(q, k, bq, bkv, min_blocks=min_blocks, **rule), logits,
                          n_floor, thr)
    if seed % 3 == 0:  # the mask output (unions) selects the same blocks
        mask = topk_block_mask(q, k, bq, bkv, min_blocks=min_blocks, **rule)
        assert mask.dtype == torch.bool
        assert torch.equal(mask, BlockLayout(*got, s, s, bq, bkv).to_block_mask_tensor())


@pytest.mark.parametrize("rule", [dict(ratio=0.1), dict(ratio=0.003, min_blocks=5), dict(threshold=0.9)])
def test_about_a_thousand_key_blocks(rule):
    # Hunyuan-720p has 929 key blocks: BN = 1024 lanes, a few query rows per program.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3 * 310, 4, generator=g).to(DEVICE)
    k = torch.randn(1, 1, 929, 4, generator=g).to(DEVICE)
    got = topk_layout(q, k, 310, 1, **rule)
    n_floor, thr = rule_args(rule.get("ratio"), rule.get("threshold"), rule.get("min_blocks", 1), 929)
    logits = ref_logits(q, k, 310, 1, threshold_rule=thr is not None)
    assert_same_selection(got, torch_path(q, k, 310, 1, **rule), logits, n_floor, thr)
    if thr is None:
        assert (got[0] == n_floor).all()


@pytest.mark.parametrize("s,bkv,rule", [(1, 1, dict(ratio=0.5)), (5, 8, dict(threshold=0.3)),
                                        (16, 16, dict(threshold=1.0, min_blocks=3))])
def test_single_key_block(s, bkv, rule):
    q, k = torch.randn(1, 2, s, 8, device=DEVICE), torch.randn(1, 2, s, 8, device=DEVICE)
    counts, indices = topk_layout(q, k, 4, bkv, **rule)
    assert (counts == 1).all() and (indices == 0).all()


def test_exact_ties_keep_the_lower_block_index():
    # Key blocks 0, 2, 5 identical, 1 and 4 identical: exact ties in fp32 (same pooled vector, same ops).
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn(3, 1, 4, 8, generator=g)
    order = [0, 1, 0, 2, 1, 0]
    k = torch.cat([blocks[i] for i in order], 1)[None].expand(2, 2, -1, -1).contiguous().to(DEVICE)
    q = torch.randn(2, 2, 24, 8, generator=g).to(DEVICE)
    for rule in (dict(ratio=0.5), dict(ratio=0.2), dict(threshold=0.5), dict(threshold=0.9, min_blocks=2)):
        got = topk_layout(q, k, 4, 4, **rule)
        want = naive_topk_layout(q, k, 4, 4, **rule)  # ties: lower index first
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), rule
        # torch.topk / sort order ties as they like: compare the kept scores and counts
        ref_c, ref_i = torch_path(q, k, 4, 4, **rule)
        assert torch.equal(got[0], ref_c)
        scores = block_scores(q, k, 4, 4, backend="torch")
        kept = torch.gather(scores, -1, got[1].long()).sort(-1).values
        ref_kept = torch.gather(scores, -1, ref_i.long()).sort(-1).values
        live = torch.arange(6, device=DEVICE) < ref_c[..., None]
        assert torch.allclose(kept[live], ref_kept[live], atol=1e-6)
    # all scores equal (q = 0): the first blocks win, and the masses are exact
    zeros = torch.zeros(1, 1, 24, 8, device=DEVICE)
    tied = topk_layout(zeros, k[:1, :1], 4, 4, ratio=0.5)[1]
    assert (tied.cpu() == torch.tensor([0, 1, 2, 0, 0, 0])).all()
    assert (topk_layout(zeros, k[:1, :1], 4, 4, threshold=0.5)[0] == 3).all()


@pytest.mark.parametrize("rule", [dict(ratio=1e-3), dict(ratio=0.3, min_blocks=4), dict(ratio=1.0),
                                  dict(threshold=0.4), dict(threshold=0.97, min_blocks=3), dict(threshold=1.0)])
def test_many_ties_match_the_reference(rule):
    """Layouts (and masks) equal to the reference with many exact ties (small integers pooled over
    power-of-two blocks, scale 1: every logit exact), B > 1, Mk = 23 (not a power of two) and Mq = 5 (a
    partial tile of query rows); ratio 1e-3 keeps one block, ratio 1 all of them."""
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-2, 3, (2, 2, 5 * 4, 8), generator=g).float().to(DEVICE)
    k = torch.randint(-1, 2, (2, 2, 23 * 2, 8), generator=g).float().to(DEVICE)
    want = naive_topk_layout(q, k, 4, 2, scale=1.0, **rule)
    counts, indices = topk_layout(q, k, 4, 2, scale=1.0, **rule)
    assert torch.equal(counts.cpu(), want[0]) and torch.equal(indices.cpu(), want[1])
    mask = topk_block_mask(q, k, 4, 2, scale=1.0, **rule)
    assert torch.equal(mask, BlockLayout(counts, indices, 20, 46, 4, 2).to_block_mask_tensor())


def test_threshold_by_hand():
    # As tests/test_patterns.py: two full blocks of equal score carry 0.5 each; a tail block of 1 token
    # weighs a quarter of a full block of 4 (masses 0.8 / 0.2).
    q, k = torch.zeros(1, 1, 8, 4, device=DEVICE), torch.randn(1, 1, 8, 4, device=DEVICE)
    assert int(topk_layout(q, k, 8, 4, threshold=0.5)[0]) == 1
    assert int(topk_layout(q, k, 8, 4, threshold=0.6)[0]) == 2
    counts, indices = topk_layout(q[:, :, :5], k[:, :, :5], 8, 4, threshold=0.75)
    assert int(counts) == 1 and indices.flatten().tolist() == [0, 0]
    assert int(topk_layout(q[:, :, :5], k[:, :, :5], 8, 4, threshold=0.81)[0]) == 2


def test_scale_matters_for_the_threshold_rule_only():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 40, 8, generator=g).to(DEVICE), torch.randn(1, 2, 40, 8, generator=g).to(DEVICE)
    for scale in (0.05, 3.0):
        a = topk_layout(q, k, 8, 4, ratio=0.3, scale=scale)
        assert torch.equal(a[1], topk_layout(q, k, 8, 4, ratio=0.3)[1])
        got = topk_layout(q, k, 8, 4, threshold=0.7, scale=scale)
        logits = ref_logits(q, k, 8, 4, scale=scale, threshold_rule=True)
        assert_same_selection(got, torch_path(q, k, 8, 4, threshold=0.7, scale=scale), logits, 1, 0.7)
    wide = topk_layout(q, k, 8, 4, threshold=0.7, scale=0.05)[0]
    sharp = topk_layout(q, k, 8, 4, threshold=0.7, scale=3.0)[0]
    assert wide.sum() > sharp.sum()  # a flatter softmax needs more blocks to reach the same mass


def test_non_contiguous_inputs_of_different_dtypes():
    # [B, S, H, D] viewed as [B, H, S, D] (diffusers' layout); q and k pooled in one launch.
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 45, 3, 16, generator=g).to(DEVICE, torch.float16).transpose(1, 2)
    k = torch.randn(2, 45, 3, 16, generator=g).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    got = topk_layout(q, k, 8, 4, ratio=0.4)
    n_floor = math.ceil(0.4 * 12)
    assert_same_selection(got, torch_path(q, k, 8, 4, ratio=0.4), ref_logits(q, k, 8, 4), n_floor)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=st.integers(1, 90), bkv=st.sampled_from([1, 2, 4]), ratio=st.floats(0.01, 1.0),
       levels=st.sampled_from([2, 5, 0]), magnitude=st.sampled_from([1e-3, 1.0, 1e4]), seed=st.integers(0, 99))
def test_ratio_select_by_bisection_equals_the_sort(s, bkv, ratio, levels, magnitude, seed):
    """The ratio rule's n-th largest score by bisection over the int32 order images keeps exactly the blocks
    the bitonic sort keeps: negative, tiny and huge scores, and many exact ties (levels > 0: integer-valued
    inputs with that many distinct values)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (magnitude * torch.randn(1, 2, s, 8, generator=g) for _ in range(2))
    if levels:
        q, k = q.sign(), torch.randint(-levels, levels + 1, (1, 2, s, 8), generator=g).float()
    q, k = q.to(DEVICE), k.to(DEVICE)
    q_t, k_t = fused.pool_qk_triton(q, k, 4, bkv)
    mk = k_t.shape[-1]
    n_floor, _ = rule_args(ratio, None, 1, mk)
    for out_mask in (False, True):
        got = fused.topk_select_triton(q_t, k_t, s, bkv, 0.3, n_floor, None, out_mask, ratio_select="bisect")
        want = fused.topk_select_triton(q_t, k_t, s, bkv, 0.3, n_floor, None, out_mask, ratio_select="sort")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="ratio_select"):
        fused.topk_select_triton(q_t, k_t, s, bkv, 0.3, n_floor, None, ratio_select="heap")


def test_ratio_select_method_by_row_width():
    assert fused.ratio_select_method(256) == "sort" and fused.ratio_select_method(fused.BISECT_MIN_LANES) == "bisect"
    assert fused.ratio_select_method(4096) == "bisect"


def test_every_output_written(monkeypatch):
    """Outputs come from torch.empty: fill them with garbage first, so an unwritten slot shows up."""
    real_empty = torch.empty

    def garbage_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 77)

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 75, 8, generator=g).to(DEVICE), torch.randn(1, 2, 75, 8, generator=g).to(DEVICE)
    for rule in (dict(ratio=0.3), dict(threshold=0.8)):
        want = topk_layout(q, k, 8, 4, **rule)
        want_mask = topk_block_mask(q, k, 8, 4, **rule)
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", garbage_empty)
            got = topk_layout(q, k, 8, 4, **rule)
            got_mask = topk_block_mask(q, k, 8, 4, **rule)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(got_mask, want_mask)


def test_two_launches_and_no_host_sync(monkeypatch):
    """The launchers only read shapes: two kernel launches, no .item() / bool(tensor) / .tolist()."""
    launches = []

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid))

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the fused top-k build")

    monkeypatch.setattr(fused, "_pool_qk_kernel", FakeKernel("pool"))
    monkeypatch.setattr(fused, "_topk_select_kernel", FakeKernel("select"))
    q, k = torch.randn(1, 3, 100, 16, device=DEVICE), torch.randn(1, 3, 100, 16, device=DEVICE)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    topk_layout(q, k, 8, 4, threshold=0.9, min_blocks=2)
    topk_block_mask(q, k, 8, 4, ratio=0.2)
    assert [n for n, _ in launches] == ["pool", "select"] * 2
    assert launches[0][1][1:] == (3, 2)  # (blocks, B*H, q|k)
    assert launches[1][1][1] == 3  # (query-block tiles, B*H)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(ratio=0.5, threshold=0.5), "exactly one"),
    (dict(ratio=0.0), "ratio"),
    (dict(threshold=1.5), "threshold"),
    (dict(ratio=True), "ratio"),
    (dict(ratio=0.5, min_blocks=0), "min_blocks"),
    (dict(ratio=0.5, block_kv=0), "block_kv"),
])
def test_validation(kwargs, match):
    q = torch.randn(1, 2, 16, 8, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        topk_layout(q, q, **{"block_q": 4, "block_kv": 4, **kwargs})


def test_too_many_key_blocks_and_cpu_without_interpreter(monkeypatch):
    q = torch.randn(1, 1, fused.MAX_KV_BLOCKS + 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="key blocks"):
        topk_layout(q, q, 64, 1, ratio=0.1)
    assert fused.fused_topk_supported(q, fused.FUSED_MAX_KV_BLOCKS)  # TopK's fused range ends here
    assert not fused.fused_topk_supported(q, fused.FUSED_MAX_KV_BLOCKS + 1)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend='torch'"):
            topk_layout(q[:, :, :8], q[:, :, :8], 4, 4, ratio=0.5)
        assert not fused.fused_topk_supported(q, 2)


# --------------------------------------------------------------------------------------------- through the pattern
def _builds(pattern, ctx, q, k, monkeypatch, fused_path):
    """(layout, mask) of ``pattern`` with the fused path on or off (off: the PyTorch backend, as on a CPU
    without the Triton interpreter)."""
    with monkeypatch.context() as m:
        if not fused_path:
            m.delenv("TRITON_INTERPRET", raising=False)
        calls = []
        real = fused.topk_select_triton
        m.setattr(fused, "topk_select_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        layout = pattern.build(ctx, q, k)
        mask = pattern._mask(ctx, q, k)
    assert bool(calls) == fused_path
    return layout, mask


@pytest.mark.skipif(torch.cuda.is_available(), reason="the PyTorch path is reached by unsetting the interpreter")
@pytest.mark.parametrize("grid,tile,text,bq,bkv,heads,batch,patterns", [
    ((2, 4, 6), (1, 2, 2), 5, 8, 4, 2, 1,
     [TopK(ratio=0.3), TopK(threshold=0.8), Tile3D((1, 1, 3)) | TopK(ratio=0.2)]),
    ((3, 5, 7), (1, 2, 4), 3, 16, 8, 1, 2,
     [TopK(ratio=0.05, min_blocks=3), TopK(threshold=0.5, min_blocks=2), TopK(ratio=0.2, scale=0.5)]),
    ((1, 3, 3), (1, 1, 1), 0, 4, 16, 1, 1, [TopK(ratio=0.5), TopK(threshold=1.0)]),  # one key block
])
def test_topk_pattern_identical_on_fused_and_torch_paths(monkeypatch, grid, tile, text, bq, bkv, heads, batch,
                                                         patterns):
    tl = TokenLayout(*grid, text_len=text, tile=tile)
    ctx = PatternContext(tl, batch=batch, heads=heads, block_q=bq, block_kv=bkv)
    g = torch.Generator().manual_seed(sum(grid))
    q = 2 * torch.randn(batch, heads, tl.seq_len, 16, generator=g)
    k = torch.randn(batch, heads, tl.seq_len, 16, generator=g) + 0.5
    for p in patterns:
        lay_f, mask_f = _builds(p, ctx, q, k, monkeypatch, fused_path=True)
        lay_t, mask_t = _builds(p, ctx, q, k, monkeypatch, fused_path=False)
        assert torch.equal(lay_f.kv_counts, lay_t.kv_counts), p.name
        assert torch.equal(lay_f.kv_indices, lay_t.kv_indices), p.name
        assert torch.equal(mask_f, mask_t), p.name
        assert (lay_f.q_len, lay_f.kv_len, lay_f.block_q, lay_f.block_kv) == (tl.seq_len, tl.seq_len, bq, bkv)
