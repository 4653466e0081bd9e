"""Training checkpoints: save one step's full training state atomically, find the latest, restore it.

A checkpoint is a folder ``<out>/checkpoints/step-<NNNNNNNN>/`` holding

* ``trainable.safetensors`` - every trained tensor by name (``transformer.<param>`` for the transformer's
  trained parameters - all of them, or only the LoRA ones - and ``sla.<layer>.<param>`` for the SLA modules);
* ``sla_weights.safetensors`` - the SLA weights in the format of :func:`dit_sparse.sla.save_sla_weights`,
  ready for inference as they are;
* ``optimizer.pt`` - the optimizer's ``state_dict``;
* ``rng.pt`` - the RNG states (torch CPU / CUDA, Python, NumPy and the run's noise generator);
* ``loss_log.csv`` - the loss log up to this step;
* ``state.json`` - the step and the configuration that produced it.

The folder is written under a temporary name and renamed, so a listed checkpoint is always complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._atomic import atomic_dir
from .loss_log import LossLog

__all__ = ["Checkpoint", "save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``step``, trained tensors by name, optimizer / RNG states, loss log, config dict."""

    path: pathlib.Path
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict
    loss_log: LossLog
    config: dict


def rng_state(generator: torch.Generator) -> dict:
    """All RNG states a run draws from, ``generator`` (the run's noise / sigma generator) included."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    tensors: dict[str, torch.Tensor],
    sla_modules: dict,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loss_log: LossLog,
    config: dict,
    keep: int = 0,
) -> pathlib.Path:
    """Write the checkpoint of ``step`` under ``root`` and return its folder.

    ``keep > 0`` deletes all but the newest ``keep`` checkpoints afterwards (0 keeps every one).
    """
    from ..sla import save_sla_weights

    root = pathlib.Path(root)
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / "trainable.safetensors"))
        save_sla_weights(sla_modules, tmp / "sla_weights.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(generator), tmp / "rng.pt")
        loss_log.write_csv(tmp / "loss_log.csv")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config}, indent=2, default=str))
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporary folders are ignored)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on CPU)."""
    path = pathlib.Path(path)
    missing = [n for n in ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json") if not (path / n).exists()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete (missing {missing}); delete it to resume from an older one")
    state = json.loads((path / "state.json").read_text())
    log_path = path / "loss_log.csv"
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        tensors=load_file(str(path / "trainable.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        loss_log=LossLog.read_csv(log_path) if log_path.exists() else LossLog(),
        config=state.get("config", {}),
    )
