"""Public received-attention ranking (FastV, PyramidDrop): per key, the attention probability
it receives from chosen queries, averaged over them and over the query heads; O(N) memory."""

from __future__ import annotations

import math

import torch

from .._validate import check_qk_kinds, query_indices
from ..kinds import POLICY_CODES, POLICY_NAMES, token_kind
from .attention import modality_attention
from .dispatch import resolve_backend


@torch.library.custom_op("vskip::received_attention", mutates_args=())
def _received_op(
    q: torch.Tensor,
    k: torch.Tensor,
    kind: torch.Tensor,
    q_pos: torch.Tensor,
    lse: torch.Tensor,
    policy_code: int,
    visual_self: bool,
    softmax_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    policy = POLICY_NAMES[policy_code]
    if backend == "triton":
        from .triton import received as triton_received

        return triton_received.received_attention(q, k, kind, q_pos, lse, policy, visual_self, softmax_scale)
    from .pytorch import received as torch_received

    return torch_received.received_attention(q, k, kind, q_pos, lse, policy, visual_self, softmax_scale)


@_received_op.register_fake
def _(q, k, kind, q_pos, lse, policy_code, visual_self, softmax_scale, backend):
    shape = (q.shape[0], k.shape[2])
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.int32)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    policy: str = "dense",
    attention_mask: torch.Tensor | None = None,
    visual_self: bool = True,
    softmax_scale: float | None = None,
    query_positions=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention probability each key receives, fp32 [B, Nk], without an Nq x Nk matrix.

    q [B, Hq, Nq, D] are the last Nq of the Nk key positions of k [B, Hkv, Nk, D], under
    ``policy`` as in ``modality_attention``. ``query_positions`` (indices into the Nq queries,
    negatives from the end) chooses the queries that rank: ``[-1]``, the last prompt token, is
    FastV's public code and PyramidDrop; None, every query, is the FastV paper. For each key:
    the probability summed over the chosen queries allowed to attend it, divided by their
    number, averaged over the query heads; 0 when no chosen query may attend it.

    ``lse`` [B, Hq, Nq] fp32 is the log-sum-exp ``modality_attention(..., return_lse=True)``
    returned for the same q, k and policy: the ranking is then one pass over the keys. Without
    it, an attention call computes it first (with k as values: the output is discarded).
    """
    check_qk_kinds(q, k, is_visual, attention_mask, policy, backend)
    b, hq, nq = q.shape[:3]
    nk = k.shape[2]
    if lse is None:
        _, lse = modality_attention(
            q,
            k,
            k,
            is_visual,
            policy=policy,
            attention_mask=attention_mask,
            visual_self=visual_self,
            softmax_scale=softmax_scale,
            return_lse=True,
            backend=backend,
        )
    elif not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (b, hq, nq) or lse.dtype != torch.float32:
        got = f"{lse.dtype} {list(lse.shape)}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(
            f"lse must be float32 [B, Hq, Nq] = [{b}, {hq}, {nq}] (as modality_attention returns), got {got}"
        )
    elif lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    backend = resolve_backend(backend, q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    idx = query_indices(query_positions, nq, q.device)
    if query_positions is not None:
        q, lse = q.index_select(2, idx), lse.index_select(2, idx)
    q_pos = (idx + (nk - nq)).to(torch.int32).contiguous()
    kind = token_kind(is_visual, attention_mask).contiguous()
    sums, count = _received_op(
        q.contiguous(), k, kind, q_pos, lse.contiguous(), POLICY_CODES[policy], bool(visual_self), scale, backend
    )
    return torch.where(count > 0, sums / (hq * count.clamp_min(1)), torch.zeros_like(sums))
