"""Loss log of a fine-tuning run: rows kept in memory, written as CSV and drawn as a PNG, both atomically.

Columns: ``step`` (optimizer steps done), ``loss`` (training loss of that step), ``eval_loss`` (loss on a
fixed batch with fixed noise and sigmas - steady enough to compare runs), ``grad_norm`` (all trainable
parameters) and ``sla_grad_norm`` (the SLA projections only), ``lr``. A value not measured at a step is
left empty in the CSV.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib

from .._atomic import atomic_file

__all__ = ["LossLog", "COLUMNS"]

COLUMNS = ("step", "loss", "eval_loss", "grad_norm", "sla_grad_norm", "lr")


class LossLog:
    """Rows of :data:`COLUMNS`; :meth:`write_csv` / :meth:`plot` persist them, :meth:`read_csv` reloads them."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = list(rows or [])

    def log(self, step: int, **values: float) -> None:
        """Add ``values`` (names from :data:`COLUMNS`) to the row of ``step``, creating it if needed."""
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown loss-log columns {sorted(unknown)}; use {COLUMNS[1:]}")
        if self.rows and self.rows[-1]["step"] == step:
            row = self.rows[-1]
        else:
            row = {"step": int(step)}
            self.rows.append(row)
        row.update({k: float(v) for k, v in values.items()})

    def truncate(self, step: int) -> None:
        """Drop rows after ``step`` (a resumed run repeats the steps after its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]

    def column(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of one column, skipping steps where it was not measured."""
        return [(r["step"], r[name]) for r in self.rows if name in r]

    def write_csv(self, path: str | os.PathLike) -> pathlib.Path:
        path = pathlib.Path(path)
        with atomic_file(path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: ("" if k not in row else row[k]) for k in COLUMNS})
        return path

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> "LossLog":
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {"step": int(raw["step"])}
                row.update({k: float(raw[k]) for k in COLUMNS[1:] if raw.get(k) not in (None, "")})
                rows.append(row)
        return cls(rows)

    def plot(self, path: str | os.PathLike, title: str = "SLA fine-tune") -> pathlib.Path:
        """Draw training loss (and eval loss, where measured) against step into a PNG (matplotlib Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = pathlib.Path(path)
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            for name, style in (("loss", "-"), ("eval_loss", "o-")):
                points = [(s, v) for s, v in self.column(name) if math.isfinite(v)]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=name, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel("flow-matching MSE")
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            with atomic_file(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(fig)
        return path
