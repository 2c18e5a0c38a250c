"""The CUDA sources compile for every target (sm80, sm86, sm89, sm90) without a GPU.

The kernel file is plain CUDA, compiled alone with nvcc; the torch glue is
syntax-checked with the host compiler against torch's headers. Both skip when
the toolchain is absent.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from python_tests import REPO_ROOT

CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
ARCHS = ("80", "86", "89", "90")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _torch_includes():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def _cuda_include():
    # nvcc's own headers: <root>/include next to <root>/bin/nvcc (following the wrapper script if any)
    for nvcc in (NVCC, os.path.realpath(NVCC)):
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cuda_runtime.h").is_file():
            return inc
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            for tok in line.split("INCLUDES=", 1)[1].strip().strip('"').split():
                inc = Path(tok[2:].strip('"'))
                if tok.startswith("-I") and (inc / "cuda_runtime.h").is_file():
                    return inc
    return None


@needs_nvcc
def test_kernels_compile_for_all_targets(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    obj = tmp_path / "plan_schedule_kernel.o"
    cmd = [
        NVCC,
        "-c",
        "-O3",
        "-std=c++17",
        "-Werror",
        "all-warnings",
        *gencode,
        *_torch_includes(),
        str(CUDA_DIR / "plan_schedule_kernel.cu"),
        "-o",
        str(obj),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0


@needs_nvcc
def test_torch_glue_parses_against_torch_headers(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("could not locate nvcc's include directory (cuda_runtime.h)")
    from torch.utils.cpp_extension import include_paths

    extra = []
    # A CPU build of torch ships the c10/cuda headers but not this generated one; an empty
    # stand-in is enough to check the glue's use of the stream/guard API.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in include_paths()):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        extra.append(f"-I{tmp_path / 'shim'}")
    cmd = [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        *_torch_includes(),
        *extra,
        f"-I{cuda_inc}",
        str(CUDA_DIR / "plan_schedule_cuda.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"host compile failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
