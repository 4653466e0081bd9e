"""Which parameters a fine-tune trains: the whole transformer or LoRA adapters, plus every SLA projection.

Full mode trains every transformer parameter. LoRA mode (``lora_rank > 0``) freezes the transformer,
injects peft LoRA adapters into the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)
through diffusers' ``add_adapter`` and trains only those. In both modes the SLA modules' parameters
(the zero-initialised ``proj`` that maps the linear-attention branch into the output) are trained.

Trained tensors are named ``transformer.<param>`` and ``sla.<layer>.<param>``; the names are what
checkpoints store, so a resumed run finds every tensor again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TrainableParams", "LORA_TARGETS", "setup_trainable"]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainableParams:
    """The trained parameters by name, split into ``transformer`` ones and ``sla`` ones, and the LoRA config."""

    transformer: dict[str, torch.nn.Parameter]
    sla: dict[str, torch.nn.Parameter]
    lora_config: object | None = None

    def named(self) -> dict[str, torch.nn.Parameter]:
        """All trained parameters, ``transformer.*`` then ``sla.*``."""
        out = {f"transformer.{k}": p for k, p in self.transformer.items()}
        out.update({f"sla.{k}": p for k, p in self.sla.items()})
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Detached copies of every trained tensor (for a checkpoint)."""
        return {k: p.detach().clone() for k, p in self.named().items()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors back into the parameters; names must match exactly."""
        named = self.named()
        missing, unexpected = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this run's trained parameters (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}); resume with the same --lora-rank / model / SLA settings as the run that wrote it"
            )
        for k, p in named.items():
            if tensors[k].shape != p.shape:
                raise ValueError(
                    f"checkpoint tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(tensors[k])


def setup_trainable(
    transformer: torch.nn.Module,
    sla_modules: dict[str, torch.nn.Module],
    lora_rank: int = 0,
    lora_alpha: float | None = None,
) -> TrainableParams:
    """Set ``requires_grad`` for the chosen mode and return the trained parameters.

    Args:
        transformer: the diffusers transformer (SLA processors already installed).
        sla_modules: ``{layer name: SparseLinearAttention}``, one per self-attention layer.
        lora_rank: 0 trains every transformer parameter; ``r > 0`` adds rank-``r`` LoRA adapters and trains
            only those.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``, i.e. scale 1).
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {lora_rank}")
    if not sla_modules:
        raise ValueError(
            "no SLA modules found in the transformer; install SLA first (apply_sparse_attention with mode='sla')"
        )
    lora_config = None
    if lora_rank == 0:
        transformer.requires_grad_(True)
    else:
        try:
            from peft import LoraConfig
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("LoRA fine-tuning needs peft: pip install peft (or use --lora-rank 0)") from e
        if not hasattr(transformer, "add_adapter"):
            raise ValueError(
                f"{type(transformer).__name__} has no add_adapter (diffusers PeftAdapterMixin); use --lora-rank 0"
            )
        transformer.requires_grad_(False)
        lora_config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
            init_lora_weights=True,
            target_modules=list(LORA_TARGETS),
        )
        transformer.add_adapter(lora_config)
    sla_ids = set()
    sla = {}
    for layer, module in sla_modules.items():
        for pname, p in module.named_parameters():
            p.requires_grad_(True)
            sla[f"{layer}.{pname}"] = p
            sla_ids.add(id(p))
    # SLA modules may be registered inside the transformer; their parameters are listed under "sla." only.
    trained = {
        k: p
        for k, p in transformer.named_parameters()
        if p.requires_grad and id(p) not in sla_ids and (lora_rank == 0 or "lora_" in k)
    }
    if lora_rank > 0:
        for k, p in transformer.named_parameters():
            if id(p) not in sla_ids and k not in trained:
                p.requires_grad_(False)
        if not trained:
            raise ValueError(
                f"LoRA found none of the attention projections {LORA_TARGETS} in {type(transformer).__name__}"
            )
    return TrainableParams(transformer=trained, sla=sla, lora_config=lora_config)
