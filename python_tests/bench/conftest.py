"""Fixtures of the benchmark tests. The suites are the package's (``vskip_kernels.bench``);
only the device-run script bench/gpu_check.py is a repository file, loaded here by path."""

import importlib.util
import sys
from pathlib import Path

import pytest

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="session")
def gpu_check():
    """bench/gpu_check.py as a module (it is a script of the checkout, not of the package)."""
    name = "_vskip_bench_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GPU_CHECK)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
    return sys.modules[name]
