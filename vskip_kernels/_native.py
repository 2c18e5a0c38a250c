"""Access to the optional compiled extension (torch.library namespace ``vskip``).

Without the built extension every op has a PyTorch fallback; the library says
so once, then stays quiet. VSKIP_DISABLE_NATIVE=1 forces the fallbacks.

The extension is loaded when this module is first imported, not on first use:
the first use may happen inside torch.compile, which must only see a plain
module-level flag here (Dynamo ignores lru_cache and would re-run the loading).
"""

from __future__ import annotations

import os

import torch

from ._log import logger


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor can trace the native ops."""

    @torch.library.register_fake("vskip::plan_schedule")
    def _plan_schedule_fake(kind, nq, policy, visual_self, block_m, block_n):
        b, nk = kind.shape
        mt, nt = -(-nq // block_m), -(-nk // block_n)
        return (
            kind.new_empty((b, mt), dtype=torch.int32),
            kind.new_empty((b, mt, nt), dtype=torch.int32),
            kind.new_empty((b, mt), dtype=torch.int32),
            kind.new_empty((b, mt, nt), dtype=torch.int32),
        )


def _load() -> bool:
    if os.environ.get("VSKIP_DISABLE_NATIVE") == "1":
        reason = "disabled by VSKIP_DISABLE_NATIVE=1"
    else:
        try:
            from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers torch.ops.vskip.*)
        except ImportError as exc:  # depends on the build
            reason = f"not available ({exc})"
        else:
            _register_fakes()
            return True
    logger.warning("vskip_kernels: native extension %s; using PyTorch fallbacks", reason)
    return False


_AVAILABLE = _load()


def available() -> bool:
    return _AVAILABLE


def get_op(name: str):
    """The ``torch.ops.vskip.<name>`` op, or None when the extension is missing."""
    if not _AVAILABLE:
        return None
    return getattr(torch.ops.vskip, name, None)
