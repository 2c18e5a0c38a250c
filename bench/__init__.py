"""Repository side of the benchmarks (the suites themselves are ``vskip_kernels.bench``).

A package so that ``pytest bench`` imports test_bench.py as ``bench.test_bench`` with the
repository root on sys.path, i.e. this checkout's vskip_kernels, installed or not.
"""
