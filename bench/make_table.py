"""Regenerate the README performance section and the plots from bench/results:

    python bench/make_table.py [--results bench/results] [--readme README.md] [--plots-dir DIR] [--no-plots]

A wrapper of ``vskip_kernels.bench.table`` with this repository's folders as defaults
(wherever it is run from); see that module.
"""

import os
import sys

# this checkout's package, installed or not
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vskip_kernels.bench.table import main

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(results=os.path.join(root, "bench", "results"), readme=os.path.join(root, "README.md")))
