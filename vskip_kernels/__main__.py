"""``python -m vskip_kernels`` runs the ``vskip`` command line."""

import sys

from .cli import main

sys.exit(main())
