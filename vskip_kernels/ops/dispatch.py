"""Backend choice shared by the public ops."""

from __future__ import annotations

import os

import torch


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'torch' otherwise; 'triton' on CPU needs the interpreter."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreter_on():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); on CPU set "
            "TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, or use backend='torch'"
        )
    return backend
