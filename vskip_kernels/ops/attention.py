"""Public modality-aware attention: ``modality_attention`` and its varlen form.

Both go through the ``vskip::modality_attention`` custom op so a compiled model
does not graph-break on them.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from .._validate import check_attention_inputs
from ..kinds import POLICY_CODES, POLICY_NAMES, token_kind
from ..schedule import Schedule, plan_schedule, set_tile_shape_provider
from .dispatch import resolve_backend


def _pack_results(out, mass, lse, return_visual_mass, return_lse):
    if not (return_visual_mass or return_lse):
        return out
    res = (out,)
    if return_visual_mass:
        res += (mass,)
    if return_lse:
        res += (lse,)
    return res


@torch.library.custom_op("vskip::modality_attention", mutates_args=())
def _modality_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: torch.Tensor,
    full_cnt: torch.Tensor,
    full_idx: torch.Tensor,
    part_cnt: torch.Tensor,
    part_idx: torch.Tensor,
    policy_code: int,
    visual_self: bool,
    softmax_scale: float,
    block_m: int,
    block_n: int,
    want_mass: bool,
    want_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy = POLICY_NAMES[policy_code]
    if backend == "triton":
        from .triton import attention as triton_attention
        from .triton import decode as triton_decode

        sched = Schedule(
            kind, full_cnt, full_idx, part_cnt, part_idx, q.shape[2], k.shape[2], policy, visual_self, block_m, block_n
        )
        # few queries against the cache: one tile per head could not fill the GPU, so split the keys
        forward = (
            triton_decode.decode_forward if triton_decode.use_decode_path(q, k) else triton_attention.prefill_forward
        )
        out, mass, lse = forward(q, k, v, sched, softmax_scale, want_mass, want_lse)
    else:
        from .pytorch import attention as torch_backend

        out, mass, lse = torch_backend.attention_forward(
            q, k, v, kind, policy, visual_self, softmax_scale, want_mass, want_lse
        )
    # distinct placeholders: a custom op may not return the same tensor twice
    return (
        out,
        mass if want_mass else q.new_empty(0, dtype=torch.float32),
        lse if want_lse else q.new_empty(0, dtype=torch.float32),
    )


@_modality_attention_op.register_fake
def _(
    q,
    k,
    v,
    kind,
    full_cnt,
    full_idx,
    part_cnt,
    part_idx,
    policy_code,
    visual_self,
    softmax_scale,
    block_m,
    block_n,
    want_mass,
    want_lse,
    backend,
):
    def stat(wanted):
        return q.new_empty(q.shape[:3] if wanted else (0,), dtype=torch.float32)

    return torch.empty_like(q), stat(want_mass), stat(want_lse)


def default_block_sizes(q: torch.Tensor, backend: str) -> tuple[int, int]:
    if backend == "triton":
        from .triton import attention as triton_attention

        return triton_attention.block_sizes(q)
    return 64, 64


def _tile_shape_for(q: torch.Tensor) -> tuple[int, int]:
    """The (block_m, block_n) modality_attention plans with for queries like ``q``."""
    return default_block_sizes(q, resolve_backend("auto", q.device))


set_tile_shape_provider(_tile_shape_for)


# The return type follows the flags: out, (out, mass), (out, lse) or (out, mass, lse).
@overload
def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = ...,
    attention_mask: torch.Tensor | None = ...,
    visual_self: bool = ...,
    softmax_scale: float | None = ...,
    return_visual_mass: Literal[False] = ...,
    return_lse: Literal[False] = ...,
    schedule: Schedule | None = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = ...,
    attention_mask: torch.Tensor | None = ...,
    visual_self: bool = ...,
    softmax_scale: float | None = ...,
    return_visual_mass: Literal[True],
    return_lse: Literal[False] = ...,
    schedule: Schedule | None = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = ...,
    attention_mask: torch.Tensor | None = ...,
    visual_self: bool = ...,
    softmax_scale: float | None = ...,
    return_visual_mass: Literal[False] = ...,
    return_lse: Literal[True],
    schedule: Schedule | None = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = ...,
    attention_mask: torch.Tensor | None = ...,
    visual_self: bool = ...,
    softmax_scale: float | None = ...,
    return_visual_mass: Literal[True],
    return_lse: Literal[True],
    schedule: Schedule | None = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = ...,
    attention_mask: torch.Tensor | None = ...,
    visual_self: bool = ...,
    softmax_scale: float | None = ...,
    return_visual_mass: bool = ...,
    return_lse: bool = ...,
    schedule: Schedule | None = ...,
    backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_visual: torch.Tensor,
    *,
    policy: str = "vskip",
    attention_mask: torch.Tensor | None = None,
    visual_self: bool = True,
    softmax_scale: float | None = None,
    return_visual_mass: bool = False,
    return_lse: bool = False,
    schedule: Schedule | None = None,
    backend: str = "auto",
):
    """Causal attention in which the policy decides what visual queries may see.

    q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D] (Hq % Hkv == 0); queries are the last Nq
    of the Nk positions. is_visual bool [B, Nk]; attention_mask [B, Nk] (1 = token,
    0 = padding). policy: "dense", "vskip" or "frozen" (DESIGN.md). Returns out
    [B, Hq, Nq, D] in q's dtype, or (out, visual_mass, lse) restricted to the extras
    asked for (fp32 [B, Hq, Nq]). Rows with no allowed key give out 0, visual
    mass 0 and lse -inf.

    schedule: a ``plan_schedule`` result to reuse across layers (triton backend);
    planned here when omitted.
    """
    check_attention_inputs(q, k, v, is_visual, attention_mask, policy, softmax_scale, backend)
    backend = resolve_backend(backend, q.device)
    nq, nk = q.shape[2], k.shape[2]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a vskip_kernels.Schedule, got {type(schedule).__name__}")
        if not schedule.matches(nq, nk, policy, visual_self) or schedule.kind.shape[0] != q.shape[0]:
            raise ValueError(
                f"schedule was planned for B={schedule.kind.shape[0]}, Nq={schedule.nq}, Nk={schedule.nk}, "
                f"policy={schedule.policy!r}, visual_self={schedule.visual_self}; this call has "
                f"B={q.shape[0]}, Nq={nq}, Nk={nk}, policy={policy!r}, visual_self={visual_self}"
            )
        if schedule.kind.device != q.device:
            raise ValueError(f"schedule is on {schedule.kind.device} but q is on {q.device}")
    elif backend == "triton":
        bm, bn = default_block_sizes(q, backend)
        schedule = plan_schedule(
            is_visual, attention_mask, nq=nq, policy=policy, visual_self=visual_self, block_m=bm, block_n=bn
        )
    if schedule is None:
        kind = token_kind(is_visual, attention_mask)
        none = kind.new_empty(0, dtype=torch.int32)
        tensors = (kind, none, none, none, none)
        bm = bn = 0
    else:
        tensors = (schedule.kind, schedule.full_cnt, schedule.full_idx, schedule.part_cnt, schedule.part_idx)
        bm, bn = schedule.block_m, schedule.block_n
    out, mass, lse = _modality_attention_op(
        q,
        k,
        v,
        *tensors,
        POLICY_CODES[policy],
        bool(visual_self),
        scale,
        bm,
        bn,
        bool(return_visual_mass),
        bool(return_lse),
        backend,
    )
    return _pack_results(out, mass, lse, return_visual_mass, return_lse)


def _check_cu_seqlens(name, cu, total, batch=None):
    if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() == 1:
        raise ValueError(f"empty batch: {name} = {cu.tolist()} describes no sequence; it must be [B + 1] with B >= 1")
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D int32 tensor [B + 1], got {getattr(cu, 'dtype', type(cu))} "
            f"{tuple(getattr(cu, 'shape', ()))}"
        )
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name} has {cu.numel() - 1} sequences, cu_seqlens_q has {batch}")
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}, got {c}")
    return c


def modality_attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    is_visual,
    *,
    policy="vskip",
    attention_mask=None,
    visual_self=True,
    softmax_scale=None,
    return_visual_mass=False,
    return_lse=False,
    schedule=None,
    backend="auto",
):
    """flash-attn's packed layout: q [total_q, Hq, D], k/v [total_k, Hkv, D], int32 cu_seqlens,
    is_visual bool [total_k]. Sequence i's queries are the last (len_q_i) of its len_k_i keys.

    Sequences are laid out left-padded in a batch and run through ``modality_attention``
    (the causal offset of each sequence is preserved by right-aligning it). ``schedule``
    must then be planned for that padded batch (``varlen_layout`` gives its masks).
    Returns packed out [total_q, Hq, D] (and visual_mass / lse [total_q, Hq]).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be packed [total, H, D], got {tuple(getattr(t, 'shape', ()))}")
    if not isinstance(is_visual, torch.Tensor) or is_visual.dim() != 1 or is_visual.shape[0] != k.shape[0]:
        raise ValueError(
            f"is_visual must be a bool tensor [total_k] = [{k.shape[0]}], got {tuple(getattr(is_visual, 'shape', ()))}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(is_visual.shape):
        raise ValueError(f"attention_mask must be [total_k] = [{k.shape[0]}], got {tuple(attention_mask.shape)}")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], len(cq) - 1)
    lq = [b - a for a, b in zip(cq, cq[1:])]
    lk = [b - a for a, b in zip(ck, ck[1:])]
    for i, (a, b) in enumerate(zip(lq, lk)):
        if a > b:
            raise ValueError(f"sequence {i} has {a} queries but only {b} keys")
    mq, mk = max(lq), max(lk)
    if mq > max_seqlen_q or mk > max_seqlen_k:
        raise ValueError(
            f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the real maxima ({mq}, {mk})"
        )
    mq, mk = max(mq, 1), max(mk, 1)
    mk = max(mk, mq)
    qi, ki, vis_b, am_b = varlen_layout(cu_seqlens_q, cu_seqlens_k, mq, mk, is_visual, attention_mask)
    bsz = len(lq)
    qb = q.new_zeros(bsz * mq, q.shape[1], q.shape[2])
    kb = k.new_zeros(bsz * mk, k.shape[1], k.shape[2])
    vb = v.new_zeros(bsz * mk, v.shape[1], v.shape[2])
    qb[qi], kb[ki], vb[ki] = q, k, v
    to4 = lambda t, n: t.view(bsz, n, t.shape[1], t.shape[2]).transpose(1, 2)
    res = modality_attention(
        to4(qb, mq),
        to4(kb, mk),
        to4(vb, mk),
        vis_b,
        policy=policy,
        attention_mask=am_b,
        visual_self=visual_self,
        softmax_scale=softmax_scale,
        return_visual_mass=return_visual_mass,
        return_lse=return_lse,
        schedule=schedule,
        backend=backend,
    )
    res = res if isinstance(res, tuple) else (res,)
    out = res[0].transpose(1, 2).reshape(bsz * mq, q.shape[1], q.shape[2])[qi]
    stats = tuple(s.transpose(1, 2).reshape(bsz * mq, q.shape[1])[qi] for s in res[1:])
    return out if not stats else (out,) + stats


def varlen_layout(cu_seqlens_q, cu_seqlens_k, max_q, max_k, is_visual, attention_mask=None):
    """Right-aligned (left-padded) batch layout of packed sequences.

    Returns (q_rows, k_rows, is_visual [B, max_k], attention_mask [B, max_k]) where
    q_rows/k_rows map packed rows to rows of the flattened [B * max] batch.
    """
    dev = is_visual.device
    cq, ck = cu_seqlens_q.to(dev).long(), cu_seqlens_k.to(dev).long()
    bsz = cq.numel() - 1

    def rows(cu, m):
        lens = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(bsz, device=dev), lens)
        local = torch.arange(int(cu[-1]), device=dev) - cu[:-1][seq]
        return seq * m + (m - lens[seq]) + local

    qi, ki = rows(cq, max_q), rows(ck, max_k)
    vis = torch.zeros(bsz * max_k, dtype=torch.bool, device=dev)
    am = torch.zeros(bsz * max_k, dtype=torch.int32, device=dev)
    vis[ki] = is_visual.bool()
    am[ki] = 1 if attention_mask is None else attention_mask.to(torch.int32)
    return qi, ki, vis.view(bsz, max_k), am.view(bsz, max_k)
