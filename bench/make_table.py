"""Regenerate the README performance section, the plots and bench/README.md's static kernel
report from bench/results:

    python bench/make_table.py [--results bench/results] [--readme README.md] [--plots-dir DIR] [--no-plots]

A wrapper of ``vskip_kernels.bench.table`` with this repository's folders as defaults
(wherever it is run from); see that module.
"""

import os
import sys

# this checkout's package, installed or not
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vskip_kernels.bench.static_report import render_readme
from vskip_kernels.bench.table import main

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(root, "bench", "results")
    rc = main(results=results, readme=os.path.join(root, "README.md"))
    # the static kernel report's tables in bench/README.md (newest complete static-*.json)
    render_readme(results, os.path.join(root, "bench", "README.md"))
    sys.exit(rc)
