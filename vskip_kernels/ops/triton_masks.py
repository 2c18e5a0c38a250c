"""The policy mask of one (query rows x key tile) block, shared by every Triton kernel.

This is ``reference.allowed_mask`` restricted to a tile; keeping it in one place
keeps the prefill, decode and visual-mass kernels in step with the contract.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def policy_allowed(offs_n, kkind, qpos, row_live, row_visual, POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr):
    """[rows, keys] bool: causal, real key, live row, minus vskip's visual-to-visual entries.

    kkind: key kinds (0 pad, 1 text, 2 visual); qpos: key position of each row;
    row_live: the row may attend at all (real token, and not a frozen visual row);
    row_visual: the row is a visual query (only read under vskip, POLICY == 1).
    """
    allowed = row_live[:, None] & (kkind != 0)[None, :] & (offs_n[None, :] <= qpos[:, None])
    if POLICY == 1:
        blocked = row_visual[:, None] & (kkind == 2)[None, :]
        if VISUAL_SELF:
            blocked = blocked & (offs_n[None, :] != qpos[:, None])
        allowed = allowed & ~blocked
    return allowed
