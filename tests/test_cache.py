"""Tests for dit_sparse.cache: hits, refreshes, drift, branches, sharing, stats, save/load."""

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

import dit_sparse.cache as cache_mod
from dit_sparse.block_layout import BlockLayout
from dit_sparse.cache import CacheKey, PatternCache

Q_LEN, KV_LEN, BQ, BKV, HEADS = 40, 40, 16, 16, 2  # 3 x 3 blocks, tail blocks of 8 tokens


def make_layout(seed: int, batch: int = 1, heads: int = HEADS) -> BlockLayout:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, 3, 3, generator=g) < 0.5
    mask[..., 0] = True  # every row keeps a block
    return BlockLayout.from_block_mask_tensor(mask, Q_LEN, KV_LEN, BQ, BKV)


def key(layer="blocks.0.attn1", branch=None, pattern="topk_r0.5"):
    return CacheKey.for_attention(layer, pattern, Q_LEN, KV_LEN, BQ, BKV, HEADS, branch)


class Builder:
    """build_fn that counts its calls and returns a fresh layout each time."""

    def __init__(self, seed=0):
        self.calls = 0
        self.seed = seed

    def __call__(self):
        self.calls += 1
        return make_layout(self.seed + self.calls)


def same_layout(a: BlockLayout, b: BlockLayout) -> bool:
    return (
        (a.q_len, a.kv_len, a.block_q, a.block_kv) == (b.q_len, b.kv_len, b.block_q, b.block_kv)
        and torch.equal(a.kv_counts, b.kv_counts)
        and torch.equal(a.kv_indices, b.kv_indices)
    )


# ---------------------------------------------------------------------------------------------- keys
def test_key_normalizes_shape_and_validates():
    k = CacheKey("l", "p", [torch.tensor(40).numpy()[()], torch.Size([3, 4]), "x"], 1)
    assert k.shape == (40, (3, 4), "x")
    assert hash(k) == hash(CacheKey("l", "p", (40, (3, 4), "x"), 1))
    for bad in [
        dict(layer="", pattern="p", shape=()),
        dict(layer=3, pattern="p", shape=()),
        dict(layer="*", pattern="p", shape=()),
        dict(layer="l", pattern="", shape=()),
        dict(layer="l", pattern="p", shape=5),
        dict(layer="l", pattern="p", shape=(), branch=-1),
        dict(layer="l", pattern="p", shape=(), branch=True),
    ]:
        with pytest.raises(ValueError):
            CacheKey(**bad)


# ---------------------------------------------------------------------------------------------- lookup
def test_hit_and_miss():
    cache, build = PatternCache(), Builder()
    first = cache.get_or_build(key(), 0, build)
    for step in range(1, 6):
        assert cache.get_or_build(key(), step, build) is first
    assert build.calls == 1
    cache.get_or_build(key(pattern="other"), 0, build)
    assert build.calls == 2 and len(cache) == 2 and key() in cache
    s = cache.stats()
    assert (s["hits"], s["misses"], s["builds"], s["lookups"]) == (5, 2, 2, 7)
    assert s["hit_rate"] == pytest.approx(5 / 7)


def test_refresh_every():
    cache, build = PatternCache(refresh_every=3), Builder()
    built_at = []
    for step in range(10):
        before = build.calls
        cache.get_or_build(key(), step, build)
        if build.calls > before:
            built_at.append(step)
    assert built_at == [0, 3, 6, 9]
    s = cache.stats()
    assert (s["misses"], s["refreshes"], s["hits"], s["drift_refreshes"]) == (1, 3, 6, 0)


def test_step_going_back_reanchors_instead_of_refreshing():
    cache, build = PatternCache(refresh_every=2), Builder()
    cache.get_or_build(key(), 5, build)
    cache.get_or_build(key(), 0, build)  # next generation starts: entry anchored at step 0
    cache.get_or_build(key(), 1, build)
    assert build.calls == 1
    cache.get_or_build(key(), 2, build)
    assert build.calls == 2


def test_drift_refresh():
    cache, build = PatternCache(drift_threshold=0.1), Builder()
    sig = torch.ones(4, 8)
    cache.get_or_build(key(), 0, build, signature=sig)
    cache.get_or_build(key(), 1, build, signature=sig * 1.05)  # 5% change: hit
    assert build.calls == 1
    # drift is measured against the build-time signature, so small steps add up
    cache.get_or_build(key(), 2, build, signature=sig * 1.15)
    assert build.calls == 2
    cache.get_or_build(key(), 3, build, signature=sig * 1.2)  # 4% from the new build signature
    assert build.calls == 2
    cache.get_or_build(key(), 4, build, signature=torch.ones(2, 8))  # shape change counts as drift
    assert build.calls == 3
    cache.get_or_build(key(), 5, build)  # no signature: no drift check
    assert build.calls == 3
    s = cache.stats()
    assert (s["misses"], s["drift_refreshes"], s["refreshes"], s["hits"]) == (1, 2, 0, 3)


def test_signature_is_copied_and_ignored_without_threshold():
    cache, build = PatternCache(drift_threshold=0.0), Builder()
    sig = torch.ones(3)
    cache.get_or_build(key(), 0, build, signature=sig)
    sig.mul_(10)  # caller reuses its buffer; the stored signature must not change with it
    cache.get_or_build(key(), 1, build, signature=torch.ones(3))
    assert build.calls == 1
    plain, build2 = PatternCache(), Builder()
    plain.get_or_build(key(), 0, build2, signature=torch.ones(3))
    plain.get_or_build(key(), 1, build2, signature=torch.full((3,), 100.0))
    assert build2.calls == 1


def test_branches_are_separate_entries():
    cache, build = PatternCache(), Builder()
    a = cache.get_or_build(key(branch=0), 0, build)
    b = cache.get_or_build(key(branch=1), 0, build)
    whole = cache.get_or_build(key(branch=None), 0, build)
    assert build.calls == 3 and len(cache) == 3
    assert cache.get_or_build(key(branch=0), 1, build) is a
    assert cache.get_or_build(key(branch=1), 1, build) is b
    assert cache.get_or_build(key(branch=None), 1, build) is whole


def test_share_across_layers():
    cache, build = PatternCache(share_across_layers=True), Builder()
    first = cache.get_or_build(key("blocks.0.attn1"), 0, build)
    assert cache.get_or_build(key("blocks.1.attn1"), 0, build) is first
    assert build.calls == 1 and len(cache) == 1
    per_layer = cache.stats()["layers"]
    assert per_layer["blocks.0.attn1"]["misses"] == 1 and per_layer["blocks.0.attn1"]["hits"] == 0
    assert per_layer["blocks.1.attn1"]["hits"] == 1 and per_layer["blocks.1.attn1"]["misses"] == 0
    separate, build2 = PatternCache(), Builder()
    separate.get_or_build(key("blocks.0.attn1"), 0, build2)
    separate.get_or_build(key("blocks.1.attn1"), 0, build2)
    assert build2.calls == 2


def test_bad_arguments():
    for kwargs in [
        dict(refresh_every=0), dict(refresh_every=1.5), dict(refresh_every=True),
        dict(drift_threshold=-0.1), dict(drift_threshold=float("nan")), dict(drift_threshold="0.1"),
        dict(max_signature_numel=0),
    ]:
        with pytest.raises(ValueError):
            PatternCache(**kwargs)
    cache = PatternCache(drift_threshold=0.1, max_signature_numel=16)
    with pytest.raises(ValueError, match="CacheKey"):
        cache.get_or_build(("l", "p"), 0, Builder())
    with pytest.raises(ValueError, match="step"):
        cache.get_or_build(key(), -1, Builder())
    with pytest.raises(ValueError, match="pooled"):
        cache.get_or_build(key(), 0, Builder(), signature=torch.ones(17))
    with pytest.raises(ValueError, match="BlockLayout"):
        cache.get_or_build(key(), 0, lambda: torch.ones(3))
    assert len(cache) == 0


# ---------------------------------------------------------------------------------------------- stats
def test_stats_need_no_host_sync_in_the_hot_path(monkeypatch):
    layouts = [make_layout(1), make_layout(2)]
    cache = PatternCache(refresh_every=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the hot path")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, forbidden)
        for step in range(4):  # built at 0 and 2, hits at 1 and 3, for both layers
            for layer in ("a", "b"):
                cache.get_or_build(key(layer), step, lambda: layouts[step // 2])
    s = cache.stats()
    d0, d1 = (float(lay.density().mean()) for lay in layouts)
    assert s["mean_density"] == pytest.approx((d0 + d1) / 2)
    assert s["layers"]["a"]["mean_density"] == pytest.approx((d0 + d1) / 2)
    assert (s["misses"], s["refreshes"], s["hits"]) == (2, 2, 4)


def test_density_weighted_by_serves_and_per_layer():
    dense = BlockLayout.dense(Q_LEN, KV_LEN, BQ, BKV)
    diag = BlockLayout.from_block_mask_tensor(torch.eye(3, dtype=torch.bool)[None, None], Q_LEN, KV_LEN, BQ, BKV)
    d_diag = float(diag.density().mean())  # (16*16 + 16*16 + 8*8) / 40^2
    assert d_diag == pytest.approx(576 / 1600)
    cache = PatternCache()
    for step in range(3):
        cache.get_or_build(key("dense_layer"), step, lambda: dense)
    cache.get_or_build(key("diag_layer"), 0, lambda: diag)
    s = cache.stats()
    assert s["layers"]["dense_layer"]["mean_density"] == pytest.approx(1.0)
    assert s["layers"]["diag_layer"]["mean_density"] == pytest.approx(d_diag)
    assert s["mean_density"] == pytest.approx((3 * 1.0 + d_diag) / 4)
    assert all(isinstance(v, (int, float)) for v in s.values() if not isinstance(v, dict))


def test_build_time_uses_perf_counter_and_no_sync(monkeypatch):
    clock = iter(range(0, 1000, 5))  # every perf_counter() call advances 5 "seconds"
    monkeypatch.setattr(cache_mod, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (_ for _ in ()).throw(AssertionError("synced")))
    cache, build = PatternCache(), Builder()
    cache.get_or_build(key("a"), 0, build)
    cache.get_or_build(key("a"), 1, build)  # hit: not timed
    cache.get_or_build(key("b"), 0, build)
    s = cache.stats()
    assert s["build_time_s"] == 10.0
    assert s["layers"]["a"]["build_time_s"] == 5.0 and s["layers"]["b"]["build_time_s"] == 5.0


def test_reset_stats_and_clear():
    cache, build = PatternCache(), Builder()
    cache.get_or_build(key(), 0, build)
    cache.get_or_build(key(), 1, build)
    cache.reset_stats()
    s = cache.stats()
    assert (s["lookups"], s["hits"], s["build_time_s"], s["layers"]) == (0, 0, 0.0, {})
    assert math.isnan(s["mean_density"])
    assert len(cache) == 1
    cache.get_or_build(key(), 2, build)  # still cached after reset_stats
    assert build.calls == 1 and cache.stats()["hits"] == 1
    cache.clear()
    assert len(cache) == 0 and cache.stats()["hits"] == 1
    cache.get_or_build(key(), 3, build)
    assert build.calls == 2


# ---------------------------------------------------------------------------------------------- save / load
@dataclass(frozen=True)
class FakeTokenLayout:
    frames: int
    height: int
    width: int


def test_save_load_round_trip(tmp_path):
    cache = PatternCache(refresh_every=4, drift_threshold=0.25)
    keys = [key("l0", branch=0), key("l0", branch=1), key("l1"),
            CacheKey("l2", "tile3d", (FakeTokenLayout(2, 4, 5), HEADS), None)]
    layouts = [make_layout(i) for i in range(3)] + [make_layout(9).expand(1, HEADS)]
    sig = torch.randn(2, 3, 4, dtype=torch.float16)
    for i, (k, lay) in enumerate(zip(keys, layouts)):
        cache.get_or_build(k, 7, lambda lay=lay: lay, signature=sig if i == 0 else None)
    path = tmp_path / "patterns.safetensors"
    cache.save(path)
    assert sorted(os.listdir(tmp_path)) == ["patterns.safetensors"]

    loaded = PatternCache.load(path)
    assert (loaded.refresh_every, loaded.drift_threshold, loaded.share_across_layers) == (4, 0.25, False)
    assert len(loaded) == 4 and loaded.stats()["lookups"] == 0

    def must_not_build():
        raise AssertionError("a loaded entry should be served")

    for k, lay in zip(keys, layouts):
        assert same_layout(loaded.get_or_build(k, 0, must_not_build), lay)
    # the saved signature came back: a big drift refreshes, a small one does not
    loaded.get_or_build(keys[0], 1, must_not_build, signature=sig)
    rebuilt = Builder()
    loaded.get_or_build(keys[0], 2, rebuilt, signature=sig * 3)
    assert rebuilt.calls == 1
    # loaded entries are anchored at the step first served (0), so refresh_every counts from there
    loaded.get_or_build(keys[2], 4, rebuilt)
    assert rebuilt.calls == 2
    s = loaded.stats()
    assert (s["hits"], s["drift_refreshes"], s["refreshes"]) == (5, 1, 1)
    # overrides win over the saved config
    assert PatternCache.load(path, refresh_every=None).refresh_every is None


def test_save_load_shared_and_empty(tmp_path):
    shared = PatternCache(share_across_layers=True)
    lay = make_layout(3)
    shared.get_or_build(key("a"), 0, lambda: lay)
    shared.save(tmp_path / "s.safetensors")
    back = PatternCache.load(tmp_path / "s.safetensors")
    assert back.share_across_layers and same_layout(back.get_or_build(key("zzz"), 0, Builder()), lay)
    with pytest.raises(ValueError, match="share_across_layers"):
        PatternCache.load(tmp_path / "s.safetensors", share_across_layers=False)
    PatternCache().save(tmp_path / "e.safetensors")
    assert len(PatternCache.load(tmp_path / "e.safetensors")) == 0


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    cache = PatternCache()
    cache.get_or_build(key(), 0, lambda: make_layout(1))
    cache.save(path)
    old = path.read_bytes()

    def broken_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", broken_writer)
    cache.get_or_build(key("other"), 0, lambda: make_layout(2))
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert path.read_bytes() == old  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]  # no temp file left behind
    with pytest.raises(OSError):
        cache.save(tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


def test_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError, match="not a dit-sparse pattern cache"):
        PatternCache.load(plain)
    future = tmp_path / "future.safetensors"
    save_file({}, str(future), metadata={"format": cache_mod.FORMAT, "version": "999"})
    with pytest.raises(ValueError, match="version"):
        PatternCache.load(future)
    damaged = tmp_path / "damaged.safetensors"
    entries = json.dumps([{"key": "[]", "q_len": 1, "kv_len": 1, "block_q": 1, "block_kv": 1, "signature": False}])
    save_file({}, str(damaged), metadata={"format": cache_mod.FORMAT, "version": cache_mod.FORMAT_VERSION,
                                          "config": "{}", "entries": entries})
    with pytest.raises(ValueError, match="damaged"):
        PatternCache.load(damaged)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError):
        PatternCache.load(junk)


# ---------------------------------------------------------------------------------------------- hot path cost
def test_build_density_from_counts_matches_layout_density():
    g = torch.Generator().manual_seed(0)
    for q_len, kv_len, bq, bkv, b, h in [(40, 40, 16, 16, 1, 2), (64, 48, 16, 16, 2, 3), (33, 70, 8, 16, 1, 1),
                                         (5, 5, 8, 8, 1, 1), (128, 100, 32, 7, 2, 2)]:
        mq, mk = -(-q_len // bq), -(-kv_len // bkv)
        for p in (0.0, 0.3, 0.8, 1.0):
            mask = torch.rand(b, h, mq, mk, generator=g) < p
            layout = BlockLayout.from_block_mask_tensor(mask, q_len, kv_len, bq, bkv)
            broadcast = BlockLayout.from_block_mask_tensor(mask[:1, :1], q_len, kv_len, bq, bkv)
            for lay in (layout, layout.expand(b, h), broadcast):
                want = float(lay.density().mean())
                for got in (cache_mod._mean_density(lay), cache_mod.mean_density_torch(lay), *triton_density(lay)):
                    assert got.dtype == torch.float32 and got.dim() == 0
                    assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-7)


def triton_density(layout):
    """The one-launch density (``kernels/block_sparse/layout_density.py``), where Triton runs: on CUDA, or
    under the interpreter on CPU tensors; nothing otherwise."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return ()
    from dit_sparse.kernels.block_sparse.layout_density import mean_density_triton

    return (mean_density_triton(layout.to("cuda" if torch.cuda.is_available() else "cpu")),)


def test_fingerprint_memo_keeps_keys_of_equal_value_but_other_types_apart():
    cache = PatternCache()
    shapes = [(1, (2, 3)), (1.0, (2, 3)), (True, (2, 3)), (1, (2.0, 3)), (1, (2, 3))]
    layouts = [make_layout(i) for i in range(len(shapes))]
    for shape, lay in zip(shapes, layouts):
        cache.get_or_build(CacheKey("l", "p", shape), 0, lambda lay=lay: lay)
    assert len(cache) == 4  # the last shape is the first one again
    for shape, lay in zip(shapes[:4], layouts):
        k = CacheKey("l", "p", shape)
        assert k.fingerprint() in cache._entries and cache._fingerprint(k) == k.fingerprint()
        assert cache.get_or_build(k, 1, Builder()) is lay
    shared = PatternCache(share_across_layers=True)
    k = CacheKey("l", "p", (1,))
    assert shared._fingerprint(k) == k.fingerprint(True) != k.fingerprint(False)
    # an unhashable object in a shape still works (no memo)
    unhashable = CacheKey("l", "p", ({"a": 1},))
    cache.get_or_build(unhashable, 0, lambda: layouts[0])
    assert unhashable in cache


def test_hits_do_no_tensor_work():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    @dataclass(frozen=True)
    class Layout:  # stands in for TokenLayout in the engine's keys
        frames: int
        height: int

    cache = PatternCache(refresh_every=5)
    lay = make_layout(1)
    for layer in ("a", "b"):
        cache.get_or_build(CacheKey(layer, "topk_r0.1", (Layout(3, 4), 1, HEADS), 0), 0, lambda: lay)
    with Count():
        for step in range(1, 5):
            for layer in ("a", "b"):  # a fresh key per call, as the engine makes them
                assert cache.get_or_build(CacheKey(layer, "topk_r0.1", (Layout(3, 4), 1, HEADS), 0), step,
                                          Builder()) is lay
    assert Count.ops == 0
    assert cache.stats()["hits"] == 8
