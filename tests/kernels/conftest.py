"""Fixtures of the kernel tests."""

import pytest


@pytest.fixture
def no_interpreter(monkeypatch):
    for name in ("TRITON_INTERPRET", "DIT_SPARSE_HOPPER_FWD", "DIT_SPARSE_HOPPER_BWD"):
        monkeypatch.delenv(name, raising=False)
