"""Shared helpers of the GPU benchmarks: timing, environment info, attention FLOP counts, reports.

Every benchmark script times with :func:`bench_ms` (median of ``triton.testing.do_bench``), records
:func:`env_info` next to its numbers, and writes ``<out>/<stem>.json`` + ``<out>/<stem>.md`` with
:func:`write_report` (temp file then rename, so a killed run never leaves half a report).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from typing import Callable, Iterable, Sequence

import torch

from dit_sparse._atomic import atomic_write_text

__all__ = [
    "bench_ms",
    "env_info",
    "attention_flops",
    "tflops",
    "markdown_table",
    "write_report",
    "rel_rms",
    "sync",
]


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100,
             grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median run time of ``fn`` in milliseconds (``triton.testing.do_bench``, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def sync(device) -> None:
    """Wait for ``device`` (a CUDA device; a no-op for others) to finish its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def env_info() -> dict:
    """GPU name, date and library versions, to store next to every benchmark result."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # Host-side timings (launch latencies, synchronised builds) suffer when other work shares the CPUs: record
    # how busy the host was (1-minute load average when this is called, usually at the end of a run).
    info["host_cpus"] = os.cpu_count()
    info["host_load_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
    else:
        info["gpu"] = None
    return info


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, density: float,
                    mode: str) -> float:
    """FLOPs of attention on the kept fraction ``density`` of (query, key) pairs.

    Forward: two matmuls of 2 FLOPs per multiply-add, ``4 * B * H * Sq * Skv * D * density``.
    Forward + backward: 3.5x the forward (backward = 2.5x: five matmuls against the forward's two).
    """
    fwd = 4.0 * batch * heads * q_len * kv_len * head_dim * density
    if mode == "fwd":
        return fwd
    if mode == "fwdbwd":
        return 3.5 * fwd
    raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def rel_rms(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Relative RMS error ``rms(actual - ref) / rms(ref)``, computed in fp32."""
    ref, actual = ref.float(), actual.float()
    return ((actual - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str, stem: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Write ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md`` atomically; returns their paths."""
    json_path = os.path.join(out_dir, f"{stem}.json")
    md_path = os.path.join(out_dir, f"{stem}.md")
    atomic_write_text(json_path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    atomic_write_text(md_path, markdown.rstrip() + "\n")
    return json_path, md_path
