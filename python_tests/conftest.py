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
    config.addinivalue_line(
        "markers", "hf: Hugging Face integration; CI also runs these under the oldest supported transformers"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- test ids

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def pytest_make_parametrize_id(config, val, argname):
    """Readable ids for parametrized values, by type and by the suite's argument names, so a
    kernel case reads ``[vskip-bf16-d64-nq1-gqa4]`` rather than ``[vskip-dtype0-64-1-heads0]``:

    * a torch dtype: ``fp16``, ``bf16``, ``fp32``, ``fp64``;
    * ``d`` / ``head_dim``: ``d64``; ``n`` / ``nk``: ``N300``; ``nq``: ``nq77`` (None: ``nqfull``);
      ``bs`` (cache block size): ``bs16``;
    * ``gqa`` / ``group`` (query heads per KV head): ``gqa4``; ``heads`` = (Hq, Hkv): ``gqa<Hq/Hkv>``;
    * ``block`` / ``blocks`` = (block_m, block_n): ``m64n32``;
    * ``visual_self``: ``self`` / ``noself``;
    * a dict of keyword arguments: ``key=value,key=value``.

    Anything else keeps pytest's own id; an explicit ``ids=`` or ``pytest.param(id=...)`` wins.
    """
    if isinstance(val, torch.dtype):
        return DTYPE_IDS.get(val, str(val).removeprefix("torch."))
    if isinstance(val, bool):
        return ("self" if val else "noself") if argname == "visual_self" else None
    if argname == "nq" and val is None:
        return "nqfull"
    if isinstance(val, int):
        prefix = {
            "d": "d",
            "head_dim": "d",
            "n": "N",
            "nk": "N",
            "nq": "nq",
            "bs": "bs",
            "gqa": "gqa",
            "group": "gqa",
        }.get(argname)
        return None if prefix is None else f"{prefix}{val}"
    if isinstance(val, tuple) and len(val) == 2 and all(isinstance(x, int) for x in val):
        if argname in ("block", "blocks"):
            return f"m{val[0]}n{val[1]}"
        if argname == "heads":
            return f"gqa{val[0] // val[1]}"
    if isinstance(val, dict) and all(isinstance(k, str) for k in val):
        return ",".join(f"{k}={v}" for k, v in val.items())
    return None
