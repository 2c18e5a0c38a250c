import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. The
# switch is read when a kernel is decorated, so it must be set before any
# vskip_kernels Triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when none is present)")
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line("markers", "hf: Hugging Face integration; CI also runs these under the oldest "
                                       "supported transformers")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
