"""The vocabulary every layer shares: token kinds, attention policies and their codes.

The executable spec (``reference.py``), the planners, both backends and the Triton
kernels all read these; the kernels through the ``tl.constexpr`` copies in
``ops/triton/masks.py``. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch


class TokenKind(IntEnum):
    """Per-position kind, stored as int8 in schedules and in the paged per-slot tensor."""

    PAD = 0
    TEXT = 1
    VISUAL = 2


class Policy(IntEnum):
    """What a visual query may attend to (DESIGN.md); the value is the kernels' POLICY code."""

    DENSE = 0
    VSKIP = 1
    FROZEN = 2


KIND_PAD, KIND_TEXT, KIND_VISUAL = int(TokenKind.PAD), int(TokenKind.TEXT), int(TokenKind.VISUAL)
POLICIES = tuple(p.name.lower() for p in Policy)  # ("dense", "vskip", "frozen")
POLICY_CODES = {p.name.lower(): int(p) for p in Policy}
POLICY_NAMES = {int(p): p.name.lower() for p in Policy}

# exp(x) = exp2(x * LOG2E): the kernels' softmax runs in base 2; LN2 converts back for the LSE
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def token_kind(is_visual: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Nk] int8: 0 = padding, 1 = text, 2 = visual."""
    kind = torch.where(is_visual.bool(), KIND_VISUAL, KIND_TEXT).to(torch.int8)
    if attention_mask is not None:
        kind = torch.where(attention_mask.bool(), kind, torch.zeros_like(kind))
    return kind


def policy_allows(query_kind, key_kind, query_pos, key_pos, policy: str, visual_self: bool = True):
    """May a query attend a key (DESIGN.md), elementwise over broadcasting tensors.

    Causal, neither side padding; under ``vskip`` a visual query sees no visual key but its
    own (``visual_self``); under ``frozen`` a visual query sees nothing. The PyTorch backends
    and the FlexAttention mask share this rule; the Triton kernels keep their own copy
    (``ops/triton/masks.policy_allowed``) and the spec (``reference.py``) its independent one.
    """
    ok = (key_pos <= query_pos) & (query_kind != KIND_PAD) & (key_kind != KIND_PAD)
    if policy == "vskip":
        blocked = (query_kind == KIND_VISUAL) & (key_kind == KIND_VISUAL)
        if visual_self:
            blocked = blocked & (key_pos != query_pos)
        ok = ok & ~blocked
    elif policy == "frozen":
        ok = ok & (query_kind != KIND_VISUAL)
    return ok
