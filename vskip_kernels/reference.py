"""Executable specification of the attention contract in DESIGN.md.

Naive and dense on purpose: every backend and kernel is tested against these
functions. They build the full [B, Nq, Nk] mask and the full score matrix, so
they are only for small test shapes.
"""

from __future__ import annotations

import math

import torch

from .kinds import KIND_PAD, KIND_TEXT, KIND_VISUAL, POLICIES, token_kind  # noqa: F401  (the spec's vocabulary)


def allowed_mask(
    is_visual: torch.Tensor,
    attention_mask: torch.Tensor | None,
    nq: int,
    policy: str = "vskip",
    visual_self: bool = True,
) -> torch.Tensor:
    """[B, Nq, Nk] bool: may query i (the i-th of the last nq positions) attend to key j."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    b, nk = is_visual.shape
    kind = token_kind(is_visual, attention_mask)
    qpos = torch.arange(nk - nq, nk, device=is_visual.device)
    kpos = torch.arange(nk, device=is_visual.device)
    causal = kpos[None, :] <= qpos[:, None]  # [Nq, Nk]
    k_real = kind != KIND_PAD  # [B, Nk]
    q_kind = kind[:, nk - nq :]  # [B, Nq]
    q_real = q_kind != KIND_PAD
    allowed = causal[None] & k_real[:, None, :] & q_real[:, :, None]
    q_vis = (q_kind == KIND_VISUAL)[:, :, None]
    k_vis = (kind == KIND_VISUAL)[:, None, :]
    if policy == "vskip":
        is_self = (kpos[None, :] == qpos[:, None])[None]
        blocked = q_vis & k_vis
        if visual_self:
            blocked = blocked & ~is_self
        allowed = allowed & ~blocked
    elif policy == "frozen":
        allowed = allowed & ~q_vis
    return allowed


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = "vskip",
    attention_mask: torch.Tensor | None = None,
    visual_self: bool = True,
    softmax_scale: float | None = None,
    upcast: bool = True,
):
    """Returns (out [B,Hq,Nq,D] in q's dtype, visual_mass [B,Hq,Nq] fp32, lse [B,Hq,Nq] fp32).

    upcast=True computes in a wider type than the input (fp32 for fp16/bf16, fp64 for
    fp32: the accuracy reference); upcast=False keeps the input dtype for scores,
    softmax and the PV product, which is how far a plain implementation in that dtype
    drifts (the tolerance yardstick; for fp32 inputs it is then a real one, not zero).
    Empty rows: out 0, visual_mass 0, lse -inf.
    """
    dtype = q.dtype
    if upcast:
        wide = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
    hq, nq, d = q.shape[1], q.shape[2], q.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    allowed = allowed_mask(is_visual, attention_mask, nq, policy, visual_self)[:, None]  # [B,1,Nq,Nk]
    scores = (
        torch.matmul(q * scale, k.transpose(-1, -2)) if not upcast else torch.matmul(q, k.transpose(-1, -2)) * scale
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_any = allowed.any(-1)  # [B,1,Nq]
    s32 = scores if scores.dtype == torch.float64 else scores.float()  # statistics in >= fp32
    lse = torch.logsumexp(s32, dim=-1)
    lse = torch.where(row_any, lse, torch.full_like(lse, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed, probs, torch.zeros_like(probs))  # all-masked rows -> 0, not NaN
    out = torch.matmul(probs.to(v.dtype), v)
    kvis = (is_visual.bool()[:, None, None, :]) & allowed
    p32 = torch.where(allowed, torch.softmax(s32, dim=-1), torch.zeros_like(s32))
    mass = (p32 * kvis).sum(-1)
    return out.to(dtype), mass.float(), lse.float()


def visual_mass_ref(
    q, k, is_visual, *, policy="dense", attention_mask=None, visual_self=True, softmax_scale=None, query_positions=None
):
    """fp32 [B, Hq, Nq] (or [B, Hq, len(query_positions)]) visual share of each query's softmax."""
    v = torch.zeros_like(k[..., :1]).expand(*k.shape[:-1], 1)
    _, mass, _ = attention_ref(
        q,
        k,
        v.contiguous(),
        is_visual,
        policy=policy,
        attention_mask=attention_mask,
        visual_self=visual_self,
        softmax_scale=softmax_scale,
    )
    if query_positions is not None:
        mass = mass[:, :, torch.as_tensor(query_positions, device=mass.device, dtype=torch.long)]
    return mass


def received_attention_ref(
    q, k, is_visual, *, policy="dense", attention_mask=None, visual_self=True, softmax_scale=None, query_positions=None
):
    """fp32 [B, Nk]: the attention probability each key receives from the chosen queries
    (``query_positions``, indices into the Nq queries; default all), averaged over the queries
    allowed to attend it and over the query heads; 0 for a key no chosen query may attend.
    One chosen query (the last prompt token) is FastV's public ranking; all of them the paper's."""
    wide = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    q, k = q.to(wide), k.to(wide)
    hq, nq, d = q.shape[1], q.shape[2], q.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    allowed = allowed_mask(is_visual, attention_mask, nq, policy, visual_self)  # [B, Nq, Nk]
    scores = torch.matmul(q, _expand_kv(k, hq).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed[:, None], probs, torch.zeros_like(probs))  # [B, Hq, Nq, Nk]
    if query_positions is not None:
        idx = torch.as_tensor(query_positions, device=q.device, dtype=torch.long).reshape(-1) % nq
        probs, allowed = probs[:, :, idx], allowed[:, idx]
    count = allowed.sum(1)  # [B, Nk]: chosen queries that may attend each key
    received = probs.sum(2).mean(1) / count.clamp_min(1)
    return torch.where(count > 0, received, torch.zeros_like(received)).float()


def live_tile_pairs(allowed: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """[B, num_m, num_n] bool: tile pairs holding at least one allowed (query, key) entry."""
    b, nq, nk = allowed.shape
    mm, nn = -(-nq // block_m), -(-nk // block_n)
    padded = torch.zeros(b, mm * block_m, nn * block_n, dtype=torch.bool, device=allowed.device)
    padded[:, :nq, :nk] = allowed
    return padded.view(b, mm, block_m, nn, block_n).any(dim=4).any(dim=2)
