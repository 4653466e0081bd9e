"""Block scoring (``dit_sparse.kernels.block_score``): mean-pooled query blocks against mean-pooled,
centred key blocks, for ranking key blocks cheaply (TopK patterns, sparse-linear block selection, the
pattern cache's drift check).

* ``api.py``          - :func:`block_scores` (validation, backend dispatch)
* ``pool_score.py``   - Triton kernels + launchers (mean pooling, pooled scoring)
* ``topk_layout.py``  - fused top-k selection straight into a block layout / mask (what ``TopK`` builds
  with on the Triton backend), with its per-row reference
* ``sampled_mass.py`` - softmax mass per key block of a few sampled query rows (what ``SpatioTemporal``
  classifies heads by), without the sampled rows' logits in memory
* ``torch_backend.py``- vectorised PyTorch path for CPU
* ``naive.py``        - readable fp32 reference for tests
"""

from .api import block_scores
from .naive import naive_block_scores

__all__ = ["block_scores", "naive_block_scores"]
