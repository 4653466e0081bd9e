"""``python -m dit_sparse.cli``: the same as the ``dit-sparse`` command."""

import sys

from . import main

sys.exit(main())
