"""The attention policies as FlexAttention mask functions.

For FlexAttention users who want the semantics without our kernels, and for tests and
benchmarks that compare the two on the same mask. ``mask_mod`` follows the contract of
DESIGN.md exactly (causal, padding, policy), with queries being the last ``nq`` of the
``Nk`` key positions, as everywhere in this library. ``Schedule.to_block_mask()`` turns
a planned tile schedule into the equivalent ``BlockMask`` without evaluating the mask.
"""

from __future__ import annotations

import torch

from .kinds import POLICIES, policy_allows, token_kind


def mask_mod_from_kind(kind: torch.Tensor, policy: str = "vskip", *, nq: int | None = None, visual_self: bool = True):
    """mask_mod over a token-kind tensor ``kind [B, Nk]`` (0 padding, 1 text, 2 visual)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(kind, torch.Tensor) or kind.dim() != 2:
        raise ValueError(f"kind must be a [B, Nk] tensor, got {tuple(getattr(kind, 'shape', ()))}")
    nk = kind.shape[1]
    nq = nk if nq is None else int(nq)
    if not 0 < nq <= nk:
        raise ValueError(f"nq must be in [1, Nk={nk}], got {nq}")
    off = nk - nq

    def vskip_policy(b, h, q_idx, kv_idx):
        qp = q_idx + off
        return policy_allows(kind[b, qp], kind[b, kv_idx], qp, kv_idx, policy, visual_self)

    vskip_policy.__name__ = f"vskip_{policy}"
    return vskip_policy


def mask_mod(
    is_visual: torch.Tensor,
    policy: str = "vskip",
    attention_mask: torch.Tensor | None = None,
    *,
    nq: int | None = None,
    visual_self: bool = True,
):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for ``policy``.

    is_visual bool [B, Nk]; attention_mask [B, Nk] (1 token, 0 padding) or None; nq: the
    queries are the last nq key positions (default Nk). Use with
    ``create_block_mask(mask_mod(...), B, None, nq, Nk)``; rows with no allowed key give
    zeros in FlexAttention too.
    """
    from ._validate import check_mask_inputs

    check_mask_inputs(is_visual, attention_mask, policy)
    return mask_mod_from_kind(token_kind(is_visual, attention_mask), policy, nq=nq, visual_self=visual_self)
