"""Tile-level pieces shared by the Triton kernels: the policy mask of one (query rows x
key tile) block, and the online-softmax and split-merge steps of the split (decode,
visual-mass) kernels.

The mask is ``reference.allowed_mask`` restricted to a tile; keeping it in one place
keeps the prefill, decode and visual-mass kernels in step with the contract.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...kinds import LN2, Policy, TokenKind

# Kernels may read module globals only as constexprs: these are kinds.py's codes.
PAD = tl.constexpr(int(TokenKind.PAD))
TEXT = tl.constexpr(int(TokenKind.TEXT))
VISUAL = tl.constexpr(int(TokenKind.VISUAL))
DENSE = tl.constexpr(int(Policy.DENSE))
VSKIP = tl.constexpr(int(Policy.VSKIP))
FROZEN = tl.constexpr(int(Policy.FROZEN))
LN2_C = tl.constexpr(LN2)


@triton.jit
def policy_allowed(offs_n, kkind, qpos, row_live, row_visual, POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr):
    """[rows, keys] bool: causal, real key, live row, minus vskip's visual-to-visual entries.

    kkind: key kinds (0 pad, 1 text, 2 visual); qpos: key position of each row;
    row_live: the row may attend at all (real token, and not a frozen visual row);
    row_visual: the row is a visual query (only read under vskip, POLICY == VSKIP).
    """
    allowed = row_live[:, None] & (kkind != PAD)[None, :] & (offs_n[None, :] <= qpos[:, None])
    if POLICY == VSKIP:
        blocked = row_visual[:, None] & (kkind == VISUAL)[None, :]
        if VISUAL_SELF:
            blocked = blocked & (offs_n[None, :] != qpos[:, None])
        allowed = allowed & ~blocked
    return allowed


@triton.jit
def masked_softmax_step(s, allowed, kkind, m_i, l_i, vis_i, WANT_MASS: tl.constexpr):
    """One online-softmax step of the split kernels over a score tile ``s`` (log2 units).

    Running max, total sum and visual sum are rescaled together, so the visual share
    of every row is exact at the end. Returns (p, alpha, m_new, l_i, vis_i).
    """
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing allowed yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if WANT_MASS:
        vis_i = vis_i * alpha + tl.sum(tl.where((kkind == VISUAL)[None, :], p, 0.0), 1)
    return p, alpha, m_new, l_i, vis_i


@triton.jit
def lse_merge_step(top, lse_s):
    """One step of merging split results by their log2-sum-exp ``lse_s``.

    Returns (alpha, w, new_top): rescale what was accumulated so far by alpha and add
    this split with weight w. Splits with nothing allowed carry -inf and weigh 0.
    """
    new_top = tl.maximum(top, lse_s)
    # all -inf so far: shift by 0 so the weights are exp2(-inf) = 0, not NaN
    safe = tl.where(new_top == float("-inf"), 0.0, new_top)
    return tl.exp2(top - safe), tl.exp2(lse_s - safe), new_top
