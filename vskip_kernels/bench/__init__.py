"""Benchmark suites of vskip_kernels: ``vskip bench [SUITE ...] [options]`` or
``python -m vskip_kernels.bench ...`` (see bench/README.md in the source repository).

Suites: ``attention``, ``visual_mass``, ``decode`` (kernel microbenchmarks) and ``model``
(random-weight 7B decoders, needs transformers). Each writes one JSON file to the results
folder: ``--out DIR`` when given; else ``bench/results`` when run from the root of a source
checkout, ``./vskip_bench_results`` anywhere else (``run.default_out``). Importing this
package needs neither matplotlib (plots, ``table.py``) nor pytest-benchmark.
"""
