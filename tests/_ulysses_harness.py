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


def raised_message(fn) -> str | None:
    """The message of the ValueError ``fn()`` raises, or None when it raises none."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def enable_diffusers_cp(model, cp_plan=None, **degrees) -> None:
    """diffusers' own ``enable_parallelism`` (not :func:`parallel.enable_ulysses`) with ``degrees`` such as
    ``ring_degree=2``, on the gloo ranks' CPU devices."""
    from diffusers import ContextParallelConfig

    with parallel._cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(**degrees), cp_plan=cp_plan)


def ring_refusals(make_case, world: int, config, cp_plan=None) -> list[str]:
    """The messages ring attention is refused with: applying sparse attention (``config``) to a
    ring-parallel model, and the first call of a model made ring-parallel after applying."""
    from dit_sparse.apply import apply_sparse_attention

    case = make_case()
    enable_diffusers_cp(case.model, cp_plan, ring_degree=world)
    msgs = [raised_message(lambda: apply_sparse_attention(case.model, config))]
    case = make_case()
    apply_sparse_attention(case.model, config)
    enable_diffusers_cp(case.model, cp_plan, ring_degree=world)
    msgs.append(raised_message(case.run))
    return [m for m in msgs if m is not None]
