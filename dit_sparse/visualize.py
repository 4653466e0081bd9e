"""Pictures of block layouts: one panel per head, kept key blocks dark, to check a pattern by eye
(``render_layout(layout, "tile3d.png")``) and to show patterns in docs and reports.

Uses matplotlib's Agg canvas directly (no pyplot global state, no display needed).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ._atomic import atomic_file
from .block_layout import BlockLayout

__all__ = ["render_layout", "render_layout_array"]


def _figure(layout: BlockLayout, heads, batch: int, title: str | None, max_cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not isinstance(batch, int) or not 0 <= batch < layout.batch:
        raise ValueError(f"batch {batch!r} is out of range: the layout has batch {layout.batch}")
    if heads is None:
        heads = list(range(layout.heads))
    heads = [heads] if isinstance(heads, int) else list(heads)
    if not heads or any(not isinstance(h, int) or not 0 <= h < layout.heads for h in heads):
        raise ValueError(f"heads must be a non-empty list of indices in [0, {layout.heads}), got {heads!r}")
    if not isinstance(max_cols, int) or max_cols <= 0:
        raise ValueError(f"max_cols must be a positive int, got {max_cols!r}")

    masks = layout.to_block_mask_tensor()[batch].cpu()  # [H, Mq, Mk]
    density = layout.density()[batch].cpu()  # [H]
    cols = min(len(heads), max_cols)
    rows = math.ceil(len(heads) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows + (0.4 if title else 0.0)), dpi=80)
    FigureCanvasAgg(fig)
    for n, h in enumerate(heads):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(masks[h].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"head {h}: {100 * float(density[h]):.1f}% kept", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def render_layout_array(layout: BlockLayout, heads=None, batch: int = 0, title: str | None = None,
                        max_cols: int = 4) -> np.ndarray:
    """The picture of :func:`render_layout` as an RGB uint8 array ``[height, width, 3]``."""
    fig = _figure(layout, heads, batch, title, max_cols)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def render_layout(layout: BlockLayout, path, heads=None, batch: int = 0, title: str | None = None,
                  max_cols: int = 4) -> str:
    """Write a PNG of ``layout`` with one panel per head (``heads``: indices, default all) of ``batch``.

    Panels show the ``[Mq, Mk]`` block mask (rows: query blocks, columns: key blocks, dark: kept) and
    the head's density. ``layout`` heads of size 1 (broadcast) show as one panel. The file is written
    to a temporary name in the same folder and renamed, so readers never see a partial PNG.
    Returns the path written.
    """
    path = os.fspath(path)
    fig = _figure(layout, heads, batch, title, max_cols)
    with atomic_file(path, parents=False) as tmp:
        fig.savefig(tmp, format="png")
    return path
