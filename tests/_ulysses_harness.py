"""Shared harness of the context-parallel tests: gloo ranks in spawned processes next to the
single-process reference run, and the tolerance both compare with."""

from __future__ import annotations

import os
import threading

import torch

from dit_sparse import parallel


def save_rank_result(results: dict, out_dir: str, rank: int) -> None:
    """A rank's results, written atomically for the parent to read back."""
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)


def run_ranks_and_single(worker, world: int, out_dir: str, single_fn):
    """Launch ``world`` ranks of ``worker(rank, world, out_dir)`` and, while they start up (imports
    dominate), compute ``single_fn()`` here; returns ``(per-rank results, single)``."""
    failure = []

    def run_ranks():
        try:
            parallel.launch(worker, world, out_dir)
        except Exception as e:  # re-raised in the test thread below
            failure.append(e)

    thread = threading.Thread(target=run_ranks)
    thread.start()
    single = single_fn()
    thread.join()
    if failure:
        raise failure[0]
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return ranks, single


def assert_close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
