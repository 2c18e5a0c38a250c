"""The benchmark suites (vskip_kernels.bench) from an installed package, the GPU check script
(bench/gpu_check.py) and the CUDA-only paths the benchmarks use (baselines, CUDA-graph decode)."""
