"""Public visual-attention-mass reduction (FlashVLM's A_v), one pass, no N x N buffer."""

from __future__ import annotations

import math

import torch

from .._validate import check_qk_kinds, query_indices
from ..kinds import POLICY_CODES, POLICY_NAMES, token_kind
from .dispatch import resolve_backend


@torch.library.custom_op("vskip::visual_attention_mass", mutates_args=())
def _visual_mass_op(
    q: torch.Tensor,
    k: torch.Tensor,
    kind: torch.Tensor,
    q_pos: torch.Tensor,
    policy_code: int,
    visual_self: bool,
    softmax_scale: float,
    backend: str,
) -> torch.Tensor:
    policy = POLICY_NAMES[policy_code]
    if backend == "triton":
        from .triton import visual_mass as triton_visual_mass

        return triton_visual_mass.visual_mass(q, k, kind, q_pos, policy, visual_self, softmax_scale)
    from .pytorch import attention as torch_backend

    return torch_backend.visual_mass(q, k, kind, q_pos, policy, visual_self, softmax_scale)


@_visual_mass_op.register_fake
def _(q, k, kind, q_pos, policy_code, visual_self, softmax_scale, backend):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def visual_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = "dense",
    attention_mask: torch.Tensor | None = None,
    visual_self: bool = True,
    softmax_scale: float | None = None,
    query_positions=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Share of each query's softmax probability that lands on visual keys, fp32 in [0, 1].

    q [B, Hq, Nq, D] are the last Nq of the Nk key positions of k [B, Hkv, Nk, D].
    query_positions (ints or a 1-D tensor, indices into the Nq queries, negatives
    count from the end) restricts the work to those queries: asking for the newest
    token costs O(Nk) per head. Returns [B, Hq, Nq] or [B, Hq, len(query_positions)].
    Rows with no allowed key give 0.
    """
    check_qk_kinds(q, k, is_visual, attention_mask, policy, backend)
    nq, nk = q.shape[2], k.shape[2]
    backend = resolve_backend(backend, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    idx = query_indices(query_positions, nq, q.device)
    if query_positions is not None:
        q = q.index_select(2, idx)
    q_pos = (idx + (nk - nq)).to(torch.int32).contiguous()
    kind = token_kind(is_visual, attention_mask).contiguous()
    return _visual_mass_op(q.contiguous(), k, kind, q_pos, POLICY_CODES[policy], bool(visual_self), scale, backend)
