"""Benchmark suites of vskip_kernels (see bench/README.md). Not installed with the library."""
