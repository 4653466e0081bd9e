"""Sparse-linear attention (SLA) as an ``nn.Module``, and saving / loading its fine-tuned weights.

SLA (paper: "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention")
keeps exact softmax attention on the few critical key blocks of each query block and covers all other
blocks with linear attention, whose output goes through a learnable ``D x D`` projection:

    o = o_sparse + proj(o_linear)

``proj`` starts at zero, so an untrained :class:`SparseLinearAttention` is exactly block-sparse attention
over the critical blocks; fine-tuning teaches ``proj`` how much of the linear part to add back.
Critical blocks are the top ``topk`` fraction of key blocks per query block by pooled block scores
(:func:`dit_sparse.kernels.block_score.block_scores`), unless the caller passes a layout.

Example::

    sla = SparseLinearAttention(head_dim=128, topk=0.05)
    o = sla(q, k, v)                                   # q, k, v [B, H, S, 128]
    save_sla_weights({"blocks.0.attn1": sla}, "sla_weights.safetensors")
    modules = load_sla_weights("sla_weights.safetensors")
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ._atomic import atomic_file
from .block_layout import BlockLayout

__all__ = ["SparseLinearAttention", "save_sla_weights", "load_sla_weights", "SLA_FORMAT"]

SLA_FORMAT = "dit-sparse-sla/1"
_FEATURE_MAPS = ("softmax", "elu", "relu")
_BACKENDS = ("auto", "triton", "torch")


class SparseLinearAttention(nn.Module):
    """Sparse-linear attention over ``[B, H, S, D]`` tensors with a learnable projection of the linear part.

    Args:
        head_dim: D, the size of ``proj`` (``nn.Linear(D, D, bias=False)``, zero at init).
        topk: fraction of key blocks per query block that get exact attention, in (0, 1]; at least one
            block is always critical.
        block_q, block_kv: tokens per query / key block of the layout (the Triton kernel takes 64 or 128).
        feature_map: phi of the linear part: ``"softmax"``, ``"elu"`` (elu + 1) or ``"relu"``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``, passed to ``sparse_linear_attention``.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float = 0.05,
        block_q: int = 128,
        block_kv: int = 128,
        feature_map: str = "softmax",
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not (isinstance(topk, (int, float)) and 0.0 < topk <= 1.0):
            raise ValueError(f"topk is the fraction of critical key blocks and must be in (0, 1], got {topk!r}")
        for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
            if not isinstance(blk, int) or blk <= 0:
                raise ValueError(f"{name} must be a positive int (64 or 128 for the Triton kernel), got {blk!r}")
        if feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map {feature_map!r} is not supported; use one of {_FEATURE_MAPS}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend {backend!r} is not supported; use one of {_BACKENDS}")
        self.head_dim = head_dim
        self.topk = float(topk)
        self.block_q = block_q
        self.block_kv = block_kv
        self.feature_map = feature_map
        self.backend = backend
        self.proj = nn.Linear(head_dim, head_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the module (weights aside)."""
        return {
            "head_dim": self.head_dim,
            "topk": self.topk,
            "block_q": self.block_q,
            "block_kv": self.block_kv,
            "feature_map": self.feature_map,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    @torch.no_grad()
    def select_blocks(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """Critical blocks: the top ``ceil(topk * Mk)`` key blocks per (batch, head, query block) by pooled
        block score. q ``[B, H, Sq, D]``, k ``[B, H, Sk, D]`` -> layout ``[B, H, Mq(, Mk)]``."""
        from dit_sparse.kernels.block_score import block_scores

        scores = block_scores(q, k, self.block_q, self.block_kv)  # fp32 [B, H, Mq, Mk]
        mk = scores.shape[-1]
        keep = min(mk, max(1, math.ceil(self.topk * mk)))
        top = scores.topk(keep, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return BlockLayout.from_block_mask_tensor(mask, q.shape[2], k.shape[2], self.block_q, self.block_kv)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | None = None
    ) -> torch.Tensor:
        """q ``[B, H, Sq, D]``, k / v ``[B, H, Sk, D]`` -> ``[B, H, Sq, D]`` in q's dtype.

        ``layout`` fixes the critical blocks (its block sizes are used as given); by default they are
        chosen with :meth:`select_blocks`.
        """
        if q.dim() != 4 or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q must be [B, H, S, {self.head_dim}] for this module (head_dim={self.head_dim}); "
                f"got {tuple(q.shape)}"
            )
        from dit_sparse.kernels.sparse_linear import sparse_linear_attention

        if layout is None:
            layout = self.select_blocks(q, k)
        o_sparse, o_linear = sparse_linear_attention(
            q, k, v, layout, feature_map=self.feature_map, backend=self.backend
        )
        weight = self.proj.weight
        return o_sparse + self.proj(o_linear.to(weight.dtype)).to(o_sparse.dtype)


def save_sla_weights(modules: dict[str, SparseLinearAttention], path) -> None:
    """Save ``{layer name: SparseLinearAttention}`` to a safetensors file (temp file, then rename).

    Tensors are ``<name>.proj.weight``; each module's config is kept in the file's metadata, so
    :func:`load_sla_weights` rebuilds the modules without other input.
    """
    if not isinstance(modules, dict) or not modules:
        raise ValueError("modules must be a non-empty dict {layer name: SparseLinearAttention}")
    from safetensors.torch import save_file

    tensors, configs = {}, {}
    for name, module in modules.items():
        if not isinstance(module, SparseLinearAttention):
            raise ValueError(f"modules[{name!r}] is a {type(module).__name__}, not a SparseLinearAttention")
        for pname, tensor in module.state_dict().items():
            tensors[f"{name}.{pname}"] = tensor.detach().to("cpu").contiguous()
        configs[name] = module.config()
    metadata = {"format": SLA_FORMAT, "modules": json.dumps(configs)}

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_sla_weights(path, device=None) -> dict[str, SparseLinearAttention]:
    """Load a file written by :func:`save_sla_weights` -> ``{layer name: SparseLinearAttention}``
    (weights in their saved dtype, on ``device`` or the CPU)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no SLA weights file at {path!r}; write one with save_sla_weights")
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != SLA_FORMAT:
            raise ValueError(
                f"{path!r} is not an SLA weights file (metadata format {metadata.get('format')!r}, expected "
                f"{SLA_FORMAT!r}); write it with dit_sparse.sla.save_sla_weights"
            )
        configs = json.loads(metadata["modules"])
        names = set(f.keys())
        modules = {}
        for name, cfg in configs.items():
            module = SparseLinearAttention(**cfg)
            state = {}
            for pname in module.state_dict():
                key = f"{name}.{pname}"
                if key not in names:
                    raise ValueError(f"{path!r} lacks tensor {key!r}; the file is incomplete, save it again")
                state[pname] = f.get_tensor(key)
            module.to(state["proj.weight"].dtype)
            module.load_state_dict(state)
            modules[name] = module.to(device) if device is not None else module
    return modules

