"""The pieces of ``dit-sparse finetune`` (``dit_sparse.finetune`` is the entry point).

* ``config``        - :class:`FinetuneConfig` / :class:`FinetuneResult`
* ``loop``          - :func:`finetune`: the training run
* ``flow_matching`` - Wan's flow-matching objective (shifted sigmas, velocity target, MSE)
* ``encode`` / ``data`` - videos and prompts into latents and text states; deterministic batches per step
* ``trainable``     - full fine-tune or peft LoRA, SLA projections always trained
* ``checkpoint``    - atomic checkpoints (weights, SLA, optimizer, RNG, loss log) and resume
* ``loss_log``      - loss CSV and PNG plot
* ``atomic``        - old import path of :mod:`dit_sparse._atomic` (temp-name-then-rename writes)
"""

from .config import FinetuneConfig, FinetuneResult

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]


def __getattr__(name):
    if name == "finetune":  # the loop imports torch-heavy pieces; keep `import dit_sparse.training` light
        from .loop import finetune

        return finetune
    raise AttributeError(f"module 'dit_sparse.training' has no attribute {name!r}")
