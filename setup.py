# Build and install:
#     pip install torch            # first, the torch you will run with
#     pip install --no-build-isolation --use-pep517 -e ".[test]"
# --no-build-isolation makes the native extension (vskip_kernels._C) build against
# the torch already installed; with build isolation torch is not importable here,
# no extension is built, and the library runs on its PyTorch fallbacks.
# VSKIP_BUILD_NATIVE=0 skips the extension on purpose.
import os

from setuptools import setup

CSRC = "csrc"


def native_extensions():
    """(ext_modules, cmdclass) for vskip_kernels._C, or empty when it cannot or should not be built."""
    if os.environ.get("VSKIP_BUILD_NATIVE", "1") == "0":
        print("vskip_kernels: VSKIP_BUILD_NATIVE=0, not building the native extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "vskip_kernels: torch is not importable at build time, so the native extension is not built "
            "(the library falls back to PyTorch). Install torch first and use --no-build-isolation."
        )
        return [], {}

    # sources relative to setup.py, as setuptools requires
    cpu_sources = [f"{CSRC}/vskip_ops.cpp", f"{CSRC}/cpu/plan_schedule_cpu.cpp"]
    cuda_sources = [f"{CSRC}/cuda/plan_schedule_kernel.cu", f"{CSRC}/cuda/plan_schedule_cuda.cpp"]
    # -fopenmp-simd: lets the fp32 dot products vectorise (reassociation) without an OpenMP runtime
    cxx_flags = ["-O3", "-fopenmp-simd"]
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if with_cuda:
        ext = CUDAExtension(
            "vskip_kernels._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    else:
        ext = CppExtension("vskip_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

# Metadata, dependencies, extras and entry points live in pyproject.toml; this file only
# adds the native extension, which must be built against the installed torch.
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
