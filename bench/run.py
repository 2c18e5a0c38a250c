"""The benchmark runner, from a source checkout: ``python bench/run.py [suite ...] [options]``.

The same as ``vskip bench ...`` and ``python -m vskip_kernels.bench ...`` (the suites live in
``vskip_kernels/bench/``); see bench/README.md.
"""

import os
import sys

# this checkout's package, installed or not (as `python -m vskip_kernels.bench` from the root)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vskip_kernels.bench.run import main

if __name__ == "__main__":
    main()
