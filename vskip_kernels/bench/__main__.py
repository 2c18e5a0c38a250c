"""``python -m vskip_kernels.bench [SUITE ...] [options]``: the benchmark runner (``vskip bench``)."""

from .run import main

main()
