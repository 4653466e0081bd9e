"""TokenLayout: tile order against a brute-force reference, exact permute/unpermute round trips,
trailing text blocks, per-block coordinates, validation and caching."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.layout import TokenLayout


def reference_perm(frames, height, width, text_len, text_first, tile):
    """Tile order by sorting (tile coords, coords inside the tile) tuples; text appended last."""
    tt, th, tw = tile
    cells = list(itertools.product(range(frames), range(height), range(width)))
    key = lambda c: ((c[0] // tt, c[1] // th, c[2] // tw), (c[0] % tt, c[1] % th, c[2] % tw))  # noqa: E731
    offset = text_len if text_first else 0
    video = [offset + (t * height + h) * width + w for t, h, w in sorted(cells, key=key)]
    n_video = frames * height * width
    text = list(range(text_len)) if text_first else list(range(n_video, n_video + text_len))
    return video + text


def reference_coords(frames, height, width, tile):
    """(t, h, w) of each video token in tile order, from the brute-force permutation."""
    perm = reference_perm(frames, height, width, 0, False, tile)
    return [(v // (height * width), (v // width) % height, v % width) for v in perm]


layouts = st.builds(
    TokenLayout,
    frames=st.integers(1, 5),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    text_len=st.integers(0, 6),
    text_first=st.booleans(),
    tile=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
)


def test_hand_checked_tiny_grid():
    # 1 x 3 x 4 grid, tiles 1 x 2 x 2:   rows 0 1 2 3 / 4 5 6 7 / 8 9 10 11
    tl = TokenLayout(1, 3, 4, tile=(1, 2, 2))
    assert tl.perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 10, 11]
    assert tl.tile_grid == (1, 2, 2)
    assert tl.tile_ids().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]
    with_text = TokenLayout(1, 3, 4, text_len=2, text_first=True, tile=(1, 2, 2))
    assert with_text.perm.tolist() == [2, 3, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 0, 1]
    text_last = TokenLayout(1, 3, 4, text_len=2, text_first=False, tile=(1, 2, 2))
    assert text_last.perm.tolist()[-2:] == [12, 13]


def test_hand_checked_time_tiles():
    # 3 x 1 x 2 grid, tiles 2 x 1 x 2: tile 0 holds frames 0-1 (tokens 0 1 2 3), tile 1 frame 2 (4 5)
    tl = TokenLayout(3, 1, 2, tile=(2, 1, 2))
    assert tl.perm.tolist() == [0, 1, 2, 3, 4, 5]
    tl = TokenLayout(3, 1, 2, tile=(2, 1, 1))
    assert tl.perm.tolist() == [0, 2, 1, 3, 4, 5]


@settings(max_examples=60, deadline=None)
@given(tl=layouts)
def test_perm_matches_reference(tl):
    ref = reference_perm(tl.frames, tl.height, tl.width, tl.text_len, tl.text_first, tl.tile)
    assert tl.perm.tolist() == ref
    assert tl.seq_len == len(ref) == tl.frames * tl.height * tl.width + tl.text_len
    assert torch.equal(tl.perm[tl.inv_perm], torch.arange(tl.seq_len))
    t, h, w = tl.video_coords()
    assert list(zip(t.tolist(), h.tolist(), w.tolist())) == reference_coords(tl.frames, tl.height, tl.width, tl.tile)


@settings(max_examples=40, deadline=None)
@given(tl=layouts, dim=st.sampled_from([0, 1, -1]), dtype=st.sampled_from([torch.float32, torch.float16, torch.int64]))
def test_round_trip_exact(tl, dim, dtype):
    shape = [2, 3, 2]
    shape[dim] = tl.seq_len
    x = torch.randn(shape).mul(100).to(dtype)
    y = tl.permute(x, dim)
    assert y.shape == x.shape
    assert torch.equal(tl.unpermute(y, dim), x)
    assert torch.equal(tl.permute(tl.unpermute(x, dim), dim), x)


@settings(max_examples=40, deadline=None)
@given(tl=layouts)
def test_text_tokens_trail(tl):
    is_text = torch.zeros(tl.seq_len, dtype=torch.bool)
    if tl.text_first:
        is_text[: tl.text_len] = True
    else:
        is_text[tl.video_len:] = True
    tiled = tl.permute(is_text[None], dim=1)[0]
    assert not tiled[: tl.video_len].any()
    assert tiled[tl.video_len:].all()
    # text keeps its own relative order
    ids = tl.permute(torch.arange(tl.seq_len)[None], dim=1)[0]
    assert torch.equal(ids[tl.video_len:], torch.sort(ids[tl.video_len:]).values)


@settings(max_examples=40, deadline=None)
@given(tl=layouts, block=st.integers(1, 20))
def test_block_coords_match_brute_force(tl, block):
    bc = tl.block_coords(block)
    coords = reference_coords(tl.frames, tl.height, tl.width, tl.tile)
    m = -(-tl.seq_len // block)
    assert bc.num_blocks == m
    for i in range(m):
        toks = range(i * block, min((i + 1) * block, tl.seq_len))
        video = [coords[j] for j in toks if j < tl.video_len]
        assert bc.n_video[i] == len(video)
        assert bool(bc.is_text[i]) == any(j >= tl.video_len for j in toks)
        for a, name in enumerate("thw"):
            vals = [c[a] for c in video]
            lo, hi, mean = getattr(bc, f"{name}_min")[i], getattr(bc, f"{name}_max")[i], getattr(bc, f"{name}_mean")[i]
            if vals:
                assert (lo, hi) == (min(vals), max(vals))
                assert mean == pytest.approx(sum(vals) / len(vals), abs=1e-5)
            else:
                assert (lo, hi, float(mean)) == (-1, -1, -1.0)


@pytest.mark.parametrize("tile,block", [((4, 4, 8), 128), ((2, 8, 8), 128), ((4, 4, 4), 128), ((1, 2, 2), 8)])
def test_blocks_are_whole_tiles_when_tiles_divide(tile, block):
    grid = tuple(2 * t for t in tile)  # full tiles only
    tl = TokenLayout(*grid, tile=tile)
    vol = tile[0] * tile[1] * tile[2]
    ids = tl.tile_ids().view(-1, block)
    per_block = block // vol
    for row in ids:
        tiles, counts = torch.unique(row, return_counts=True)
        assert len(tiles) == per_block
        assert (counts == vol).all()


def test_edge_tiles_are_smaller_not_padded():
    tl = TokenLayout(5, 7, 9, tile=(4, 4, 4))
    assert tl.tile_grid == (2, 2, 3)
    assert tl.seq_len == 5 * 7 * 9
    _, counts = torch.unique(tl.tile_ids(), return_counts=True)
    assert counts.max() == 64 and counts.min() == 1 * 3 * 1


def test_hashable_and_cached():
    a = TokenLayout(2, 3, 4, text_len=1, tile=[1, 2, 2])
    b = TokenLayout(2, 3, 4, text_len=1, tile=(1, 2, 2))
    assert a == b and hash(a) == hash(b) and a.tile == (1, 2, 2)
    assert len({a, b, TokenLayout(2, 3, 4)}) == 2
    assert a.perm_on("cpu") is b.perm_on(torch.device("cpu"))
    assert a.inv_perm is a.inv_perm
    assert a.block_coords(4) is b.block_coords(4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(frames=0, height=2, width=2),
        dict(frames=1, height=-1, width=2),
        dict(frames=1, height=2, width=2.5),
        dict(frames=1, height=2, width=2, text_len=-1),
        dict(frames=1, height=2, width=2, tile=(1, 0, 1)),
        dict(frames=1, height=2, width=2, tile=(1, 2)),
        dict(frames=1, height=2, width=2, tile=3),
    ],
)
def test_validation(kwargs):
    with pytest.raises(ValueError):
        TokenLayout(**kwargs)


def test_bad_inputs_to_methods():
    tl = TokenLayout(2, 2, 2)
    with pytest.raises(ValueError, match="seq_len=8"):
        tl.permute(torch.zeros(1, 7, 3), dim=1)
    with pytest.raises(ValueError, match="out of range"):
        tl.permute(torch.zeros(8), dim=2)
    with pytest.raises(ValueError, match="block size"):
        tl.block_coords(0)
