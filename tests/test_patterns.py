"""Patterns against dense token-mask references built from token coordinates (independently of the
pattern code), unions, densities, attention recall on structured inputs, TopK rules, and SpatioTemporal
head classification."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.block_layout import BlockLayout
from dit_sparse.kernels.block_score import naive_block_scores
from dit_sparse.layout import TokenLayout
from dit_sparse.patterns import (
    Dense, FirstFrameSink, Pattern, PatternContext, SpatioTemporal, TextAlwaysOn, Tile3D, TopK, UnionPattern,
    attention_recall, layout_density,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


# ---------------------------------------------------------------------- references
def ref_coords(tl):
    """Tile-order (t, h, w) per token (text: -1), by sorting tuples: independent of dit_sparse.layout."""
    tt, th, tw = tl.tile
    cells = sorted(
        itertools.product(range(tl.frames), range(tl.height), range(tl.width)),
        key=lambda c: ((c[0] // tt, c[1] // th, c[2] // tw), (c[0] % tt, c[1] % th, c[2] % tw)),
    )
    coords = torch.tensor(cells + [(-1, -1, -1)] * tl.text_len, dtype=torch.int64).view(-1, 3)
    return coords[:, 0], coords[:, 1], coords[:, 2]


def to_blocks(token_mask, bq, bkv):
    """[..., S, S] token mask -> [..., Mq, Mk] block mask (a block pair is kept if any token pair is)."""
    s_q, s_k = token_mask.shape[-2:]
    mq, mk = math.ceil(s_q / bq), math.ceil(s_k / bkv)
    padded = torch.zeros(*token_mask.shape[:-2], mq * bq, mk * bkv, dtype=torch.bool)
    padded[..., :s_q, :s_k] = token_mask
    return padded.view(*token_mask.shape[:-2], mq, bq, mk, bkv).any(-1).any(-2)


def ref_tile3d(tl, window):
    """Token pair kept iff the key's tile lies in the query tile's window, clamped inside the tile grid."""
    t, h, w = ref_coords(tl)
    video = t >= 0
    keep = video[:, None] & video[None, :]
    grid = (tl.frames, tl.height, tl.width)
    for c, size, win, dim in zip((t, h, w), tl.tile, window, grid):
        n_tiles = -(-dim // size)
        tile = c.clamp(min=0) // size
        start = torch.clamp(tile - win // 2, min=0).clamp(max=max(n_tiles - win, 0))
        keep &= (tile[None, :] >= start[:, None]) & (tile[None, :] < start[:, None] + win)
    return keep


def block_mask(layout, b=0, h=0):
    return layout.to_block_mask_tensor()[b, h]


def make_ctx(tl, bq, bkv, heads=1, batch=1):
    return PatternContext(tl, batch=batch, heads=heads, block_q=bq, block_kv=bkv)


layouts = st.builds(
    TokenLayout,
    frames=st.integers(1, 4), height=st.integers(1, 6), width=st.integers(1, 6), text_len=st.integers(0, 5),
    text_first=st.booleans(), tile=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
)
windows = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


# ---------------------------------------------------------------------- Tile3D
@settings(max_examples=60, deadline=None)
@given(tl=layouts, window=windows, bq=st.integers(1, 12), bkv=st.integers(1, 12))
def test_tile3d_matches_token_reference(tl, window, bq, bkv):
    layout = Tile3D(window).build(make_ctx(tl, bq, bkv))
    assert (layout.batch, layout.heads) == (1, 1)
    assert torch.equal(block_mask(layout), to_blocks(ref_tile3d(tl, window), bq, bkv))


@settings(max_examples=20, deadline=None)
@given(tl=layouts, w0=windows, w1=windows, block=st.integers(2, 8))
def test_tile3d_per_head(tl, w0, w1, block):
    layout = Tile3D(per_head=[w0, w1]).build(make_ctx(tl, block, block, heads=2))
    assert layout.heads == 2
    for h, w in enumerate((w0, w1)):
        assert torch.equal(block_mask(layout, 0, h), to_blocks(ref_tile3d(tl, w), block, block))


@pytest.mark.parametrize("grid,tile,window", [
    ((4, 6, 10), (1, 2, 2), (3, 3, 3)),   # t grid 4, window clamps at both ends
    ((2, 4, 4), (1, 2, 2), (3, 3, 3)),    # grid smaller than the window: dense
    ((3, 4, 12), (1, 2, 2), (1, 1, 5)),
])
def test_tile3d_same_count_for_every_query_and_density(grid, tile, window):
    tl = TokenLayout(*grid, tile=tile)
    vol = tile[0] * tile[1] * tile[2]
    layout = Tile3D(window).build(make_ctx(tl, vol, vol))
    expect = math.prod(min(w, -(-g // t)) for g, t, w in zip(grid, tile, window))
    assert (layout.kv_counts == expect).all()
    assert float(layout_density(layout)) == pytest.approx(expect / tl.num_tiles)


def test_tile3d_two_tiles_per_block_covers_sta():
    # 4x4x4 tiles, block 128: two tiles per block; the layout covers every pair STA keeps, and no more
    # than the union of the windows of the two tiles.
    tl = TokenLayout(8, 8, 16, tile=(4, 4, 4))
    layout = Tile3D((1, 1, 1)).build(make_ctx(tl, 128, 128))
    ref = to_blocks(ref_tile3d(tl, (1, 1, 1)), 128, 128)
    assert torch.equal(block_mask(layout), ref)
    assert (layout.kv_counts == 1).all()  # blocks hold whole (t, h) rows of 2 tiles: own block only


# ---------------------------------------------------------------------- text, sink, dense, union
@settings(max_examples=30, deadline=None)
@given(tl=layouts, bq=st.integers(1, 12), bkv=st.integers(1, 12))
def test_text_always_on_matches_reference(tl, bq, bkv):
    t, _, _ = ref_coords(tl)
    text = t < 0
    ref = to_blocks(text[:, None] | text[None, :], bq, bkv)
    assert torch.equal(block_mask(TextAlwaysOn().build(make_ctx(tl, bq, bkv))), ref)


@settings(max_examples=30, deadline=None)
@given(tl=layouts, frames=st.integers(1, 3), bq=st.integers(1, 12), bkv=st.integers(1, 12))
def test_first_frame_sink_matches_reference(tl, frames, bq, bkv):
    t, _, _ = ref_coords(tl)
    sink = (t >= 0) & (t < frames)
    ref = to_blocks(sink[None, :].expand(tl.seq_len, -1), bq, bkv)
    assert torch.equal(block_mask(FirstFrameSink(frames).build(make_ctx(tl, bq, bkv))), ref)


def test_dense():
    tl = TokenLayout(3, 5, 7, text_len=3)
    layout = Dense().build(make_ctx(tl, 16, 8))
    assert layout.to_block_mask_tensor().all()
    assert float(layout.density()) == 1.0


def test_union_is_or_of_members_and_flattens():
    tl = TokenLayout(3, 6, 6, text_len=7, text_first=True, tile=(1, 2, 3))
    ctx = make_ctx(tl, 6, 6, heads=2)
    members = [Tile3D(per_head=[(1, 1, 1), (3, 1, 1)]), TextAlwaysOn(), FirstFrameSink()]
    union = (members[0] | members[1]) | members[2]
    assert isinstance(union, UnionPattern) and len(union.patterns) == 3
    assert union.name == "tile3d_ph1x1x1-3x1x1+text_always_on+first_frame_sink_f1"
    layout = union.build(ctx)
    expect = torch.zeros(2, ctx.num_q_blocks, ctx.num_kv_blocks, dtype=torch.bool)
    for p in members:
        expect |= p.build(ctx).expand(1, 2).to_block_mask_tensor()[0]
    assert torch.equal(layout.to_block_mask_tensor()[0], expect)
    assert not union.needs_qk and (union | TopK(ratio=0.5)).needs_qk
    # density of the union is at least each member's, at most the sum
    d = [float(p.build(ctx).density().max()) for p in members]
    assert max(d) <= float(layout.density().max()) <= sum(d) + 1e-6


def test_names_carry_parameters():
    assert Tile3D((3, 3, 3)).name == "tile3d_w3x3x3"
    assert TopK(ratio=0.25).name == "topk_r0.25"
    assert TopK(threshold=0.9, min_blocks=2).name == "topk_t0.9_min2"
    assert FirstFrameSink(2).name == "first_frame_sink_f2"
    assert SpatioTemporal(2, 1).name.startswith("spatiotemporal_f2_tr1")


# ---------------------------------------------------------------------- metrics
@pytest.mark.parametrize("chunk_elements", [1, 3 * 2 * 2 * 8 * 73, 1 << 24])  # 1, 3, all query blocks per chunk
def test_recall_and_density_against_brute_force(chunk_elements, monkeypatch):
    from dit_sparse.patterns import metrics

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    tl = TokenLayout(2, 5, 7, text_len=3)
    s = tl.seq_len
    q, k = torch.randn(2, 2, s, 8), torch.randn(2, 2, s, 8)
    mask = torch.rand(2, 2, math.ceil(s / 8), math.ceil(s / 4)) < 0.4
    layout = BlockLayout.from_block_mask_tensor(mask, s, s, 8, 4)
    token = mask.repeat_interleave(8, 2)[:, :, :s].repeat_interleave(4, 3)[:, :, :, :s]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    assert torch.allclose(attention_recall(layout, q, k), (probs * token).sum(-1).mean(-1), atol=1e-5)
    assert torch.allclose(layout_density(layout), token.float().mean((-1, -2)), atol=1e-6)
    assert torch.allclose(attention_recall(BlockLayout.dense(s, s, 8, 4), q, k), torch.ones(2, 2))
    empty = BlockLayout.from_block_mask_tensor(torch.zeros_like(mask), s, s, 8, 4)
    assert attention_recall(empty, q, k).abs().max() == 0


def structured_qk(tl, sigma2=0.5, global_logit=-1.0, global_tokens=(0, 5)):
    """Local attention (logit -|x_q - x_k|^2 / sigma2 over grid coordinates) plus a few global keys
    that every query sees with logit ``global_logit``, as video DiT heads do. Use with scale=1."""
    t, h, w = ref_coords(tl)
    x = torch.stack([t, h, w], -1).float()
    norm = (x * x).sum(-1, keepdim=True) / sigma2
    q = torch.cat([x, torch.ones_like(norm), norm + global_logit], -1)
    k = torch.cat([2 * x / sigma2, -norm, torch.zeros_like(norm)], -1)
    for g in global_tokens:  # global keys: no position term, constant logit for every query
        k[g] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    return q[None, None], k[None, None]


def test_recall_high_for_right_pattern_low_for_wrong_one():
    tl = TokenLayout(6, 8, 8, tile=(1, 2, 2))
    ctx = make_ctx(tl, 4, 4)
    q, k = structured_qk(tl)
    local = Tile3D((3, 3, 3))
    right = local | FirstFrameSink()
    m_right, m_local = right.measure(ctx, q, k, scale=1.0), local.measure(ctx, q, k, scale=1.0)
    assert m_right["recall"] > 0.97
    assert m_local["recall"] < m_right["recall"] - 0.1  # misses the global keys
    # the same number of blocks, in the wrong place: windows shifted by half the key blocks
    shifted = ctx.layout_from_mask(torch.roll(local.build(ctx).to_block_mask_tensor(), ctx.num_kv_blocks // 2, -1))
    assert float(shifted.density()) == pytest.approx(m_local["density"])
    assert float(attention_recall(shifted, q, k, scale=1.0)) < 0.5
    # the dynamic pattern finds local and global blocks itself, at a similar density
    m_topk = TopK(ratio=m_right["density"]).measure(ctx, q, k, scale=1.0)
    assert m_topk["recall"] > m_local["recall"]
    assert set(m_topk) >= {"name", "density", "recall", "density_per_head", "recall_per_head"}


# ---------------------------------------------------------------------- TopK
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mk=st.integers(1, 12), tail=st.integers(1, 4),
       ratio=st.floats(0.01, 1.0), min_blocks=st.integers(1, 4))
def test_topk_ratio_rule(seed, mk, tail, ratio, min_blocks):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 5, mk, generator=g)
    keep = TopK(ratio=ratio, min_blocks=min_blocks).select(scores, 4 * (mk - 1) + tail, 4)
    n = min(mk, max(min_blocks, math.ceil(ratio * mk)))
    assert (keep.sum(-1) == n).all()
    kept_min = torch.where(keep, scores, torch.inf).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, scores).amax(-1)
    assert (kept_min >= dropped_max).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mk=st.integers(1, 12), tail=st.integers(1, 4),
       threshold=st.one_of(st.floats(0.05, 1.0), st.just(1.0)), min_blocks=st.integers(1, 3))
def test_topk_threshold_rule(seed, mk, tail, threshold, min_blocks):
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(2, 4, mk, generator=g)
    kv_len = 4 * (mk - 1) + tail
    keep = TopK(threshold=threshold, min_blocks=min_blocks).select(scores, kv_len, 4)
    lengths = torch.tensor([4.0] * (mk - 1) + [float(tail)], dtype=torch.float64)
    for row_scores, row_keep in zip(scores.view(-1, mk), keep.view(-1, mk)):
        weights = torch.softmax(row_scores.double() + lengths.log(), 0)
        order = weights.argsort(descending=True).tolist()
        mass, n = 0.0, 0
        while mass < threshold and n < mk:  # fewest blocks that reach the threshold
            mass += float(weights[order[n]])
            n += 1
        n = mk if threshold >= 1.0 else min(mk, max(n, min_blocks))
        assert int(row_keep.sum()) == n
        assert sorted(row_keep.nonzero().flatten().tolist()) == sorted(order[:n])


def test_topk_threshold_by_hand():
    # Two full blocks of equal score carry mass 0.5 each: 0.5 is reached by one block, 0.6 needs two.
    scores = torch.zeros(1, 2)
    assert TopK(threshold=0.5).select(scores, 8, 4).sum() == 1
    assert TopK(threshold=0.6).select(scores, 8, 4).sum() == 2
    # A tail block of 1 token weighs a quarter of a full block of 4 at the same score: 0.8 vs 0.2.
    tail = TopK(threshold=0.75).select(torch.zeros(1, 2), 5, 4)
    assert tail.tolist() == [[True, False]]


def test_topk_build_uses_pooled_scores_per_head():
    torch.manual_seed(1)
    tl = TokenLayout(2, 4, 6, text_len=5, tile=(1, 2, 2))
    ctx = make_ctx(tl, 8, 4, heads=2, batch=2)
    q, k = torch.randn(2, 2, tl.seq_len, 16), torch.randn(2, 2, tl.seq_len, 16)
    layout = TopK(ratio=0.3).build(ctx, q, k)
    assert (layout.batch, layout.heads) == (2, 2)
    ref = naive_block_scores(q, k, 8, 4)
    keep = layout.to_block_mask_tensor()
    n = math.ceil(0.3 * ctx.num_kv_blocks)
    assert (layout.kv_counts == n).all()
    kept_min = torch.where(keep, ref, torch.inf).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, ref).amax(-1)
    assert (kept_min >= dropped_max - 1e-5).all()
    assert not torch.equal(keep[0, 0], keep[0, 1])  # heads choose independently


@pytest.mark.parametrize("kwargs", [{}, dict(ratio=0.5, threshold=0.5), dict(ratio=0.0), dict(ratio=1.5),
                                    dict(threshold=-0.1), dict(ratio=0.5, min_blocks=0),
                                    dict(ratio=True)])  # the fused kernel's rule check: one check for both
def test_topk_validation(kwargs):
    with pytest.raises(ValueError):
        TopK(**kwargs)


# ---------------------------------------------------------------------- SpatioTemporal
@settings(max_examples=40, deadline=None)
@given(tl=layouts, f=st.integers(1, 2), tr=st.integers(0, 1), sr=st.integers(0, 1),
       bq=st.integers(1, 10), bkv=st.integers(1, 10))
def test_spatiotemporal_masks_match_reference(tl, f, tr, sr, bq, bkv):
    ctx = make_ctx(tl, bq, bkv)
    p = SpatioTemporal(spatial_frames=f, temporal_radius=tr, spatial_radius=sr)
    t, h, w = ref_coords(tl)
    video = t >= 0
    pair = video[:, None] & video[None, :]
    group = t.clamp(min=0) // f
    spatial = pair & ((group[:, None] - group[None, :]).abs() <= tr)
    assert torch.equal(p.spatial_mask(ctx), to_blocks(spatial, bq, bkv))

    def extents(block):  # per block (h_min, h_max, w_min, w_max) of its video tokens, by brute force
        out = []
        for i in range(0, tl.seq_len, block):
            sel = video[i:i + block]
            hs, ws = h[i:i + block][sel].tolist(), w[i:i + block][sel].tolist()
            out.append((min(hs), max(hs), min(ws), max(ws)) if hs else None)
        return out

    ref = torch.zeros(ctx.num_q_blocks, ctx.num_kv_blocks, dtype=torch.bool)
    for i, a in enumerate(extents(bq)):
        for j, b in enumerate(extents(bkv)):
            if a and b:
                ref[i, j] = (b[0] <= a[1] + sr and b[1] >= a[0] - sr and b[2] <= a[3] + sr and b[3] >= a[2] - sr)
    temporal = p.temporal_mask(ctx)
    assert torch.equal(temporal, ref)
    # never less than the per-token ideal: same (h, w) place (+ radius) in any frame
    same_place = pair & ((h[:, None] - h[None, :]).abs() <= sr) & ((w[:, None] - w[None, :]).abs() <= sr)
    assert not (to_blocks(same_place, bq, bkv) & ~temporal).any()


def test_spatiotemporal_classifies_synthetic_heads():
    tl = TokenLayout(4, 4, 4, text_len=3, tile=(1, 2, 2))
    ctx = make_ctx(tl, 4, 4, heads=2, batch=2)
    t, h, w = ref_coords(tl)
    c = math.sqrt(32.0)  # logit 8 between tokens sharing the feature (scale 1/sqrt(16))
    frame_feat = torch.zeros(tl.seq_len, 16)
    place_feat = torch.zeros(tl.seq_len, 16)
    video = t >= 0
    frame_feat[video, t[video]] = c  # spatial head: same frame
    place_feat[video, (h * 4 + w)[video]] = c  # temporal head: same place across frames
    q = torch.stack([torch.stack([frame_feat, place_feat]), torch.stack([place_feat, frame_feat])])
    p = SpatioTemporal(num_samples=32)
    cls = p.classify(ctx, q, q)
    assert cls.is_temporal.tolist() == [[False, True], [True, False]]
    assert cls.labels() == [["spatial", "temporal"], ["temporal", "spatial"]]
    assert (torch.maximum(cls.spatial_recall, cls.temporal_recall) > 0.95).all()
    layout = p.build(ctx, q, q)
    assert p.last_classification is not None
    assert torch.equal(p.last_classification.is_temporal, cls.is_temporal)
    masks = layout.to_block_mask_tensor()
    assert torch.equal(masks[0, 0], p.spatial_mask(ctx)) and torch.equal(masks[1, 1], p.spatial_mask(ctx))
    assert torch.equal(masks[0, 1], p.temporal_mask(ctx)) and torch.equal(masks[1, 0], p.temporal_mask(ctx))
    # and the recall of the layout on these heads is that of the right mask
    assert float(attention_recall(layout, q, q).min()) > 0.9


# ---------------------------------------------------------------------- errors
def test_build_errors():
    tl = TokenLayout(2, 4, 4)
    ctx = make_ctx(tl, 4, 4, heads=2)
    q = torch.randn(1, 2, tl.seq_len, 8)
    with pytest.raises(ValueError, match="dynamic"):
        TopK(ratio=0.5).build(ctx)
    with pytest.raises(ValueError, match="both"):
        TopK(ratio=0.5).build(ctx, q)
    with pytest.raises(ValueError, match="seq_len"):
        TopK(ratio=0.5).build(ctx, q[:, :, :-1], q[:, :, :-1])
    with pytest.raises(ValueError, match="3 per-head windows"):
        Tile3D(per_head=[(1, 1, 1)] * 3).build(ctx)
    with pytest.raises(ValueError):
        Tile3D((0, 1, 1))
    with pytest.raises(ValueError):
        Tile3D(per_head=[(1, 1)])
    with pytest.raises(ValueError):
        SpatioTemporal(spatial_frames=0)
    with pytest.raises(ValueError):
        FirstFrameSink(0)
    with pytest.raises(ValueError):
        PatternContext(tl, heads=0)
    with pytest.raises(ValueError):
        PatternContext((2, 4, 4))
    with pytest.raises(ValueError):
        Dense().build("not a context")
    with pytest.raises(ValueError):
        UnionPattern([Dense(), "tile3d"])
    assert isinstance(Dense(), Pattern)


# ---------------------------------------------------------------------- pictures
def test_render_layout_pictures(tmp_path):
    from dit_sparse.visualize import render_layout, render_layout_array

    tl = TokenLayout(2, 4, 4, text_len=4, tile=(1, 2, 2))
    ctx = make_ctx(tl, 4, 4, heads=3)
    sparse = Tile3D(per_head=[(1, 1, 1), (2, 2, 2), (1, 1, 1)]).build(ctx)
    dense = Dense().build(ctx).expand(1, 3)
    empty = ctx.layout_from_mask(torch.zeros(ctx.num_q_blocks, ctx.num_kv_blocks, dtype=torch.bool)).expand(1, 3)
    img = render_layout_array(sparse)
    assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3
    one = render_layout_array(sparse, heads=[1])
    assert one.shape[1] < img.shape[1]  # one panel is narrower than three
    # kept blocks are dark: dense is darker than sparse, sparse darker than empty
    brightness = [float(render_layout_array(x, heads=[1]).mean()) for x in (dense, sparse, empty)]
    assert brightness[0] < brightness[1] < brightness[2]
    path = render_layout(sparse, tmp_path / "tile3d.png", title="tile3d")
    assert (tmp_path / "tile3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path == str(tmp_path / "tile3d.png")
    assert [p.name for p in tmp_path.iterdir()] == ["tile3d.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="heads"):
        render_layout_array(sparse, heads=[3])
    with pytest.raises(ValueError, match="batch"):
        render_layout_array(sparse, batch=1)


# ---------------------------------------------------------------------- build cost: vectorised, memoised, no host sync
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), mq=st.integers(1, 6), mk=st.integers(1, 9),
       p=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.integers(0, 1000))
def test_from_block_mask_tensor_lists_kept_blocks_ascending_then_zeros(b, h, mq, mk, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, mq, mk, generator=g) < p
    got = BlockLayout.from_block_mask_tensor(mask, mq * 4 - 1, mk * 4 - 3, 4, 4)
    # Reference: a stable sort puts each row's kept blocks first, in ascending order; zeros after them.
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    indices = torch.where(torch.arange(mk, dtype=torch.int32) < counts.unsqueeze(-1), order, 0)
    assert torch.equal(got.kv_counts, counts) and torch.equal(got.kv_indices, indices)
    assert got.kv_counts.dtype == torch.int32 and got.kv_indices.dtype == torch.int32
    expanded = mask[:1, :1].expand(b, h, mq, mk)  # broadcast (stride-0) masks convert too
    assert torch.equal(BlockLayout.from_block_mask_tensor(expanded, mq * 4, mk * 4, 4, 4).to_block_mask_tensor(),
                       expanded)


@pytest.mark.parametrize("grid,tile,text,block", [((3, 5, 7), (2, 2, 3), 3, 5), ((4, 6, 10), (1, 2, 2), 0, 4)])
def test_tile3d_chunked_tiles_match_reference(grid, tile, text, block, monkeypatch):
    from dit_sparse.patterns import tile3d

    tl = TokenLayout(*grid, tile=tile, text_len=text)
    ctx = make_ctx(tl, block, block, heads=2)
    p = Tile3D(per_head=[(3, 3, 3), (1, 2, 3)])
    whole = p.build(ctx)
    monkeypatch.setattr(tile3d, "_CHUNK_ELEMENTS", 5)  # a few tiles per chunk
    chunked = p.build(ctx)
    assert torch.equal(whole.kv_indices, chunked.kv_indices) and torch.equal(whole.kv_counts, chunked.kv_counts)
    for h, w in enumerate(p.per_head):
        assert torch.equal(block_mask(chunked, 0, h), to_blocks(ref_tile3d(tl, w), block, block))


def plain_union(members, ctx, q, k):
    """The union as BlockLayout algebra computes it: each member built on its own, then ``|``."""
    layout = None
    for p in members:
        lay = p.build(ctx, q, k) if p.needs_qk else p.build(ctx)
        layout = lay if layout is None else layout | lay
    return layout


def test_union_with_memoised_static_operand_equals_plain_union(monkeypatch):
    torch.manual_seed(3)
    tl = TokenLayout(3, 6, 8, text_len=5, tile=(1, 2, 4))
    ctx = make_ctx(tl, 8, 8, heads=2, batch=2)
    members = [Tile3D((3, 1, 3)), TopK(ratio=0.2), TextAlwaysOn(), FirstFrameSink(), SpatioTemporal(num_samples=8)]
    union = UnionPattern(members)
    calls = []
    real = Tile3D._mask
    monkeypatch.setattr(Tile3D, "_mask", lambda self, *a: calls.append(1) or real(self, *a))
    for i in range(3):  # refreshes with new q, k: the static part is built once
        q, k = torch.randn(2, 2, tl.seq_len, 16), torch.randn(2, 2, tl.seq_len, 16)
        got = union.build(ctx, q, k)
        want = plain_union(members, ctx, q, k)
        assert torch.equal(got.kv_counts, want.kv_counts) and torch.equal(got.kv_indices, want.kv_indices)
        assert (got.batch, got.heads) == (2, 2)
    static_builds = len(calls) - 3  # plain_union built Tile3D once per round
    assert static_builds == 1
    # another context gets its own static mask; clearing the memo rebuilds it, with the same result
    other = make_ctx(tl, 4, 8, heads=2, batch=2)
    assert torch.equal(union.build(other, q, k).to_block_mask_tensor(),
                       plain_union(members, other, q, k).to_block_mask_tensor())
    union.clear_static_cache()
    before = len(calls)
    again = union.build(ctx, q, k)
    assert len(calls) == before + 1
    assert torch.equal(again.kv_indices, want.kv_indices) and torch.equal(again.kv_counts, want.kv_counts)
    # a union without dynamic members is static and memoised the same way
    static = Tile3D((1, 1, 1)) | TextAlwaysOn()
    assert not static.needs_qk
    assert torch.equal(static.build(ctx).to_block_mask_tensor(),
                       plain_union(static.patterns, ctx, None, None).to_block_mask_tensor())
    assert torch.equal(static.build(ctx).kv_indices, plain_union(static.patterns, ctx, None, None).kv_indices)


def test_topk_ratio_layout_comes_straight_from_topk():
    torch.manual_seed(2)
    tl = TokenLayout(2, 5, 6, text_len=3, tile=(1, 2, 2))
    ctx = make_ctx(tl, 4, 4, heads=3, batch=2)
    q, k = torch.randn(2, 3, tl.seq_len, 8), torch.randn(2, 3, tl.seq_len, 8)
    for p in (TopK(ratio=0.3), TopK(ratio=0.01, min_blocks=3), TopK(ratio=1.0)):
        got = p.build(ctx, q, k)
        want = BlockLayout.from_block_mask_tensor(p._mask(ctx, q, k), tl.seq_len, tl.seq_len, 4, 4)
        assert torch.equal(got.kv_counts, want.kv_counts) and torch.equal(got.kv_indices, want.kv_indices)


def test_spatiotemporal_memo_follows_context_and_parameters():
    torch.manual_seed(4)
    tl = TokenLayout(4, 4, 4, tile=(1, 2, 2))
    q, k = torch.randn(1, 2, tl.seq_len, 16), torch.randn(1, 2, tl.seq_len, 16)
    p = SpatioTemporal(num_samples=16)
    for bq in (4, 8, 4):
        ctx = make_ctx(tl, bq, bq, heads=2)
        fresh = SpatioTemporal(num_samples=16).build(ctx, q, k)
        assert torch.equal(p.build(ctx, q, k).kv_indices, fresh.kv_indices)
    p.spatial_frames = 2  # parameters changed after use: the memo does not serve stale masks
    assert torch.equal(p.build(ctx, q, k).kv_indices, SpatioTemporal(2, num_samples=16).build(ctx, q, k).kv_indices)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops, and those that copy a device value to the host (``.item()``, ``bool(t)``, ...)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if str(func).startswith(self.SYNCING):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_builds_make_no_host_sync_and_a_grid_independent_number_of_ops(monkeypatch):
    # The pooled scores run in PyTorch here (not the Triton interpreter, which works on host copies).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in a pattern build")

    counts = []
    for grid, tile in [((5, 6, 9), (2, 4, 4)), ((9, 14, 30), (2, 4, 4)), ((3, 8, 8), (1, 4, 4))]:
        tl = TokenLayout(*grid, tile=tile, text_len=4)
        ctx = make_ctx(tl, 16, 16, heads=2)
        q, k = torch.randn(1, 2, tl.seq_len, 16), torch.randn(1, 2, tl.seq_len, 16)
        patterns = [Tile3D((3, 3, 3)), Tile3D(per_head=[(1, 1, 1), (3, 3, 3)]), TopK(ratio=0.2),
                    TopK(threshold=0.8), SpatioTemporal(num_samples=8),
                    Tile3D((3, 3, 3)) | TopK(ratio=0.1) | TextAlwaysOn(), FirstFrameSink()]
        ops = []
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
                m.setattr(torch.Tensor, name, forbidden)
            for p in patterns:
                for _ in range(2):  # the first build also fills the layout's cached index tables
                    with _CountOps() as c:
                        p.build(ctx, q, k) if p.needs_qk else p.build(ctx)
                    assert c.syncs == [], (p.name, c.syncs)
                ops.append(c.ops)
        counts.append(ops)
    # the same number of tensor operations for every grid (no loop over tiles or blocks), and few
    assert counts[0] == counts[1] == counts[2], counts
    assert max(counts[0]) < 150, counts[0]
