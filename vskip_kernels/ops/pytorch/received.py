"""PyTorch backend of the received-attention ranking (FastV, PyramidDrop): per key, the
attention probability it receives from chosen queries, from their log-sum-exp.

The probability of entry (i, j) is ``exp(scale * q_i . k_j - lse_i)``: with the LSE the
attention call already returned, one pass over the keys suffices and no row is normalised
twice. Queries are taken in chunks, so memory is O(chunk x Nk), never Nq x Nk.
"""

from __future__ import annotations

import torch

from .attention import allowed_rows

# Chosen queries per chunk: the [B, Hq, chunk, Nk] probabilities stay small.
_CHUNK = 256


def received_attention(q, k, kind, q_pos, lse, policy: str, visual_self: bool, scale: float):
    """(sums fp32 [B, Nk], count int32 [B, Nk]).

    q [B, Hq, S, D]: the chosen queries, at key positions q_pos [S] (any order); k [B, Hkv,
    Nk, D]; kind int8 [B, Nk]; lse fp32 [B, Hq, S] (natural log; -inf for a row with no
    allowed key). ``sums`` adds, over the chosen queries and the query heads, the probability
    each key receives; ``count`` is how many chosen queries may attend it (head-independent).
    """
    b, hq, s, _ = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    qpos = q_pos.to(device=q.device, dtype=torch.long)
    kf = k.float().repeat_interleave(group, dim=1)
    sums = torch.zeros(b, nk, dtype=torch.float32, device=q.device)
    count = torch.zeros(b, nk, dtype=torch.int32, device=q.device)
    for lo in range(0, s, _CHUNK):
        hi = min(s, lo + _CHUNK)
        pos = qpos[lo:hi]
        allowed = allowed_rows(kind, pos, policy, visual_self)  # [B, chunk, Nk]
        scores = torch.matmul(q[:, :, lo:hi].float(), kf.transpose(-1, -2)) * scale
        p = torch.exp(scores - lse[:, :, lo:hi, None])
        # where, not a product: an empty row's lse is -inf, which makes exp() inf off the mask
        p = torch.where(allowed[:, None], p, torch.zeros((), device=q.device))
        sums += p.sum((1, 2))
        count += allowed.sum(1, dtype=torch.int32)
    return sums, count
