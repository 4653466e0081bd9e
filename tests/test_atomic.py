"""Tests of dit_sparse._atomic: complete-or-nothing writes of files and folders, with the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import _atomic
from dit_sparse._atomic import (
    atomic_dir,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    default_mode,
    publish,
)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_
    os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_atomic_file_writes_and_replaces(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.suffix == ".csv"
        assert not target.exists()  # nothing under the final name while writing
        tmp.write_text("one")
    assert target.read_text() == "one"
    with atomic_file(str(target)) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "two"
    assert names(tmp_path) == ["out.csv"]


def test_atomic_file_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["w.safetensors"]
    fresh = tmp_path / "fresh.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(fresh) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert names(tmp_path) == ["w.safetensors"]


def test_atomic_file_writer_may_replace_the_temp(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_file(target) as tmp:
        tmp.unlink()  # writers such as save_file may delete and recreate the file
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["a.bin"]


def test_parents_created_or_refused(tmp_path):
    deep = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(deep, "x")
    assert deep.read_text() == "x"
    missing = tmp_path / "nope" / "c.txt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(missing, "x", parents=False)
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "nope" / "d", parents=False):
            pass
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_file_permissions_follow_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    expected = 0o666 & ~mask
    assert mode_of(plain) == expected  # what a normal open() gives
    assert default_mode() == expected and default_mode(is_dir=True) == 0o777 & ~mask
    with atomic_file(tmp_path / "ctx.txt") as tmp:
        tmp.write_text("x")
    assert mode_of(tmp_path / "ctx.txt") == expected
    assert mode_of(atomic_write_text(tmp_path / "t.txt", "x")) == expected
    assert mode_of(atomic_write_bytes(tmp_path / "b.bin", b"x")) == expected
    # An old file with other permissions is replaced by a file with the usual ones.
    old = tmp_path / "old.txt"
    old.write_text("old")
    old.chmod(0o600)
    atomic_write_text(old, "new")
    assert old.read_text() == "new" and mode_of(old) == expected


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_dir_permissions_follow_umask(tmp_path, umask, mask):
    umask(mask)
    os.mkdir(tmp_path / "plain")
    assert mode_of(tmp_path / "plain") == 0o777 & ~mask
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "a.txt").write_text("x")
    assert mode_of(tmp_path / "ckpt") == 0o777 & ~mask


def test_umask_read_without_changing_it(umask):
    umask(0o037)
    assert _atomic._umask() == 0o037
    assert os.umask(0o037) == 0o037  # still set after reading


def test_atomic_dir_replaces_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        assert d.parent == tmp_path and not any(d.iterdir())
        (d / "a.txt").write_text("one")
        (d / "only-in-first.txt").write_text("1")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("two")
    assert names(target) == ["a.txt"]  # the old folder is replaced whole, not merged
    assert (target / "a.txt").read_text() == "two"
    assert names(tmp_path) == ["ckpt"]  # no temporary or .old folder left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_keeps_old_folder(tmp_path, error):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old weights")
    with pytest.raises(error):
        with atomic_dir(target) as d:
            (d / "weights.bin").write_bytes(b"half")
            (d / "sub").mkdir()
            raise error()
    assert names(target) == ["weights.bin"] and (target / "weights.bin").read_bytes() == b"old weights"
    assert names(tmp_path) == ["model"]  # the temporary folder and its contents are gone


def test_atomic_dir_clears_a_stale_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "v").write_text("1")
    stale = tmp_path / ".ckpt.old"  # left by a run killed between the two renames
    stale.mkdir()
    (stale / "junk").write_text("junk")
    with atomic_dir(target) as d:
        (d / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert names(tmp_path) == ["ckpt"]


def test_publish_renames_with_usual_mode(tmp_path, umask):
    umask(0o022)
    tmp = tmp_path / ".x.tmp"
    tmp.write_text("x")
    tmp.chmod(0o600)
    publish(tmp, tmp_path / "x.txt")
    assert names(tmp_path) == ["x.txt"] and mode_of(tmp_path / "x.txt") == 0o644


def test_bad_data_types_raise(tmp_path):
    with pytest.raises(ValueError, match="atomic_write_bytes"):
        atomic_write_text(tmp_path / "a.txt", b"bytes")
    with pytest.raises(ValueError, match="atomic_write_text"):
        atomic_write_bytes(tmp_path / "a.bin", "text")
    assert names(tmp_path) == []


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=200), data=st.binary(max_size=200))
def test_round_trip(tmp_path_factory, text, data):
    folder = tmp_path_factory.mktemp("rt")
    assert atomic_write_text(folder / "t.txt", text).read_bytes() == text.encode("utf-8")
    assert atomic_write_bytes(folder / "b.bin", data).read_bytes() == data
    assert names(folder) == ["b.bin", "t.txt"]
