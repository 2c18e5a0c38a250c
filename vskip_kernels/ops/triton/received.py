"""Received attention (FastV / PyramidDrop ranking) in one pass over the keys, no N x N buffer.

Per key, the attention probability it receives from chosen queries, summed over the queries
and the query heads, and how many chosen queries may attend it. The probability of entry
(i, j) is ``exp2(s_ij - lse2_i)`` with the row's log-sum-exp from the attention call that
already ran (natural log, scaled to log2 by the launcher), so no softmax is recomputed.

One program per (key tile, sequence x KV head). The K tile stays in registers while the
program walks the row blocks: rows are (chosen query, head of the GQA group) pairs, so the
heads of a group share every K load, as in the visual-mass kernel. A row block that cannot
reach the tile (causal: every row before it) or has no allowed entry in it (vskip visual
rows against visual keys, frozen visual rows) is skipped before Q is loaded or a dot is
taken. Each program owns its keys, so partial sums need no atomics: [B * Hkv, Nk] sums and
a [B, Nk] count (written by the KV-head-0 programs), added over KV heads by the launcher.
Under ``count_tiles()`` each processed (row block, key tile) pair adds 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kinds import POLICY_CODES
from .common import (
    BLOCK_DS,
    DTYPES,
    LOG2E,
    aot_spec,
    block_d_for,
    check_supported,
    checked_counter,
    f32_dot,
    kernel_signature,
    row_block_for,
    row_blocks,
    split_block_n,
)
from .masks import FROZEN, PAD, VISUAL, policy_allowed
from .spec import AotSpec, register_specs


@triton.jit
def _received_kernel(
    Q, K, KIND, QPOS, LSE2, SUMS, COUNT, CNT,
    sm_scale_log2, n_kv_heads, group, n_sel, nk, head_dim, n_row_blocks,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_kind,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr, COUNT_TILES: tl.constexpr, F32_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)
    hkv = (bh % n_kv_heads).to(tl.int64)
    n0 = tile * BLOCK_N

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < nk
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kind_base = KIND + b * stride_kind
    kk = tl.load(kind_base + offs_n, mask=n_ok, other=0)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if F32_DOT:
        k = k.to(tl.float32)

    sums = tl.zeros([BLOCK_N], tl.float32)
    count = tl.zeros([BLOCK_N], tl.int32)
    for rb in range(0, n_row_blocks):
        # row r = chosen query (r // group) x head of the group (r % group)
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = r < n_sel * group
        sel = r // group
        g = r % group
        qpos = tl.load(QPOS + sel, mask=row_ok, other=-1)
        qkind = tl.load(kind_base + qpos, mask=row_ok, other=0)
        row_vis = qkind == VISUAL
        row_live = row_ok & (qkind != PAD)
        if POLICY == FROZEN:
            row_live = row_live & ~row_vis
        if tl.max(tl.where(row_live, qpos, -1), 0) >= n0:  # causal: some row reaches this tile
            allowed = policy_allowed(offs_n, kk, qpos, row_live, row_vis, POLICY, VISUAL_SELF)
            if tl.max(allowed.to(tl.int32)) > 0:
                if COUNT_TILES:
                    tl.atomic_add(CNT, 1)
                head = hkv * group + g
                q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + sel[:, None] * stride_qs + offs_d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lse2 = tl.load(LSE2 + (b * n_kv_heads * group + head) * n_sel + sel, mask=row_ok, other=0.0)
                if F32_DOT:
                    s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                # where, not a product: an empty row's lse is -inf, so exp2 is inf off the mask
                p = tl.where(allowed, tl.math.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)
                sums += tl.sum(p, 0)
                count += tl.sum((allowed & (g == 0)[:, None]).to(tl.int32), 0)

    tl.store(SUMS + bh.to(tl.int64) * nk + offs_n, sums, mask=n_ok)
    if hkv == 0:
        tl.store(COUNT + b * nk + offs_n, count, mask=n_ok)


def _block_n(block_d: int, dt: str) -> int:
    # The K tile stays in registers for the whole program: fp32 (FMA dots, no tensor cores)
    # takes half the split kernels' tile, or a 32 x 128 tile spills on sm86/sm89.
    return split_block_n(block_d, dt) // (2 if dt == "fp32" else 1)


def tile_plan(n_sel: int, group: int, dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) ``received_attention`` uses, for tests that count processed tiles."""
    dt = DTYPES[dtype]
    return row_block_for(n_sel * group, dt), _block_n(block_d_for(head_dim), dt)


def received_attention(q, k, kind, q_pos, lse, policy: str, visual_self: bool, scale: float):
    """Triton twin of ``ops.pytorch.received.received_attention`` (same arguments and results)."""
    bsz, hq, n_sel, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    check_supported("received attention", q.dtype, d)
    group = hq // hkv
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    kind = kind.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    lse2 = (lse.to(torch.float32) * LOG2E).contiguous()  # the kernel works in log2 units
    block_m, block_n = tile_plan(n_sel, group, q.dtype, d)
    n_row_blocks = triton.cdiv(n_sel * group, block_m)
    sums = torch.empty(bsz * hkv, nk, dtype=torch.float32, device=q.device)
    count = torch.empty(bsz, nk, dtype=torch.int32, device=q.device)
    counter = checked_counter(q.device)
    _received_kernel[(triton.cdiv(nk, block_n), bsz * hkv)](
        q, k, kind, q_pos, lse2, sums, count, counter if counter is not None else count,
        scale * LOG2E, hkv, group, n_sel, nk, d, n_row_blocks,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        kind.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d_for(d),
        POLICY=POLICY_CODES[policy], VISUAL_SELF=bool(visual_self), COUNT_TILES=counter is not None,
        F32_DOT=f32_dot(q.dtype), num_warps=4, num_stages=2,
    )
    return sums.view(bsz, hkv, nk).sum(1), count


def _signature(dt: str) -> dict:
    return kernel_signature(
        dict(Q=f"*{dt}", K=f"*{dt}", KIND="*i8", QPOS="*i32", LSE2="*fp32", SUMS="*fp32", COUNT="*i32", CNT="*i32",
             sm_scale_log2="fp32"),
        i32=("n_kv_heads", "group", "n_sel", "nk", "head_dim", "n_row_blocks", "stride_qb", "stride_qh",
             "stride_qs", "stride_kb", "stride_kh", "stride_kn", "stride_kind"),
        constexpr=("BLOCK_M", "BLOCK_N", "BLOCK_D", "POLICY", "VISUAL_SELF", "COUNT_TILES", "F32_DOT"))


@register_specs
def aot_specs() -> list[AotSpec]:
    """Every tile the launcher picks: each dtype x padded head dim (64 | 80, 96, 128 | 256: the
    head dim is a run-time mask bound) x row block (16 for a few chosen rows such as FastV's
    last token, 64 for every prompt query; fp32 only 16), at the heaviest mask (vskip with
    self, counting on)."""
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for block_d in BLOCK_DS:
            for block_m in row_blocks(dt):
                specs.append(aot_spec(
                    name=f"received_{dt}_bd{block_d}_m{block_m}",
                    fn=_received_kernel, signature=_signature(dt),
                    constexprs=dict(BLOCK_M=block_m, BLOCK_N=_block_n(block_d, dt), BLOCK_D=block_d,
                                    POLICY=1, VISUAL_SELF=True, COUNT_TILES=True, F32_DOT=dt == "fp32"),
                    num_warps=4, num_stages=2,
                ))
    return specs
