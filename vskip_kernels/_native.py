"""Access to the optional compiled extension (torch.library namespace ``vskip``).

Without the built extension every op has a PyTorch fallback; the library says
so once, then stays quiet.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if os.environ.get("VSKIP_DISABLE_NATIVE") == "1":
        return False
    try:
        from . import _C  # noqa: F401  (registers torch.ops.vskip.*)
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"vskip_kernels: native extension not available ({exc}); using PyTorch fallbacks",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def get_op(name: str):
    """The ``torch.ops.vskip.<name>`` op, or None when the extension is missing."""
    if not available():
        return None
    return getattr(torch.ops.vskip, name, None)
