"""Old import path of the atomic-write helpers, kept so ``dit_sparse.training.atomic`` imports keep working.

The helpers live in :mod:`dit_sparse._atomic` (used package-wide); import them from there.
"""

from .._atomic import atomic_dir, atomic_file

__all__ = ["atomic_file", "atomic_dir"]
