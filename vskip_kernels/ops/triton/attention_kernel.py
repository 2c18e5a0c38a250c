"""Triton kernel of block-sparse, modality-aware prefill attention (FlashAttention-2 style).

One program per (query tile, batch * query head). It walks the key tiles the
schedule lists for its query tile: first the *full* ones, where every entry is
allowed and no mask is built, then the *partial* ones, masked from the token
kinds. Key tiles listed in neither are never loaded.

Non-finite inputs follow the torch backend's rules (ops/pytorch/attention.py), here and in
the decode and visual-mass kernels: NaN/inf in q spoils only that query's row; in k at
key j, exactly the rows allowed to attend j (masked scores become -inf first); in v at
key j, the rows attending j and possibly other rows that share a key tile with j
(0 * NaN in P @ V). Rows with no allowed key stay exact zeros (mass 0, lse -inf), and a
NaN running sum is never mistaken for an empty row (python_tests/ops/test_hardening_inputs.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .masks import FROZEN, LN2_C, PAD, VISUAL, policy_allowed

# Finite stand-in for the running max: a row that has seen only masked entries keeps
# m = -1e30, so exp2(m_old - m_new) is exp2(0) = 1 instead of exp2(-inf + inf) = NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_step(
    q, acc, m_i, l_i, vis_i,
    k_base, v_base, kind_base, start_n, qpos, row_live, row_vis,
    stride_kn, stride_kd, stride_vn, stride_vd, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr,
    WANT_MASS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # Full tiles lie inside [0, Nk) by construction (a tile reaching past Nk has
    # padding entries, so it is never full): only the head-dim tail needs a mask.
    if MASKED:
        kv_ok = (offs_n < Nk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if MASKED or WANT_MASS:
        kkind = tl.load(kind_base + offs_n, mask=offs_n < Nk, other=0)

    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        allowed = policy_allowed(offs_n, kkind, qpos, row_live, row_vis, POLICY, VISUAL_SELF)
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if WANT_MASS:
        vis_i = vis_i * alpha + tl.sum(tl.where((kkind == VISUAL)[None, :], p, 0.0), 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if DOT_F32:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, vis_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Mass, Lse, Kind, FullCnt, FullIdx, PartCnt, PartIdx, Counter,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kind_b, stride_cnt_b, stride_idx_b, stride_idx_m,
    Hq, GROUP, Nq, Nk, qk_scale,
    TUNE_N,  # autotune bucket of the sequence length; unused by the kernel body
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr, WANT_MASS: tl.constexpr, WANT_LSE: tl.constexpr,
    COUNT_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Last query tiles have the most key tiles under causality: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kvh = (h // GROUP).to(tl.int64)

    n_full = tl.load(FullCnt + b * stride_cnt_b + pid_m)
    n_part = tl.load(PartCnt + b * stride_cnt_b + pid_m)
    # A query tile with no live key tile (e.g. visual-only under "frozen") loads
    # nothing: every load below is masked off, the loops run zero times, and the
    # epilogue writes zeros / -inf.
    nq_live = tl.where(n_full + n_part > 0, Nq, 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    m_live = offs_m < nq_live
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_live[:, None] & d_ok[None, :], other=0.0)

    kind_base = Kind + b * stride_kind_b
    qpos = offs_m + (Nk - Nq)  # query row i is key position i + Nk - Nq
    qkind = tl.load(kind_base + qpos, mask=m_live, other=0)
    row_vis = qkind == VISUAL
    row_live = qkind != PAD
    if POLICY == FROZEN:  # frozen: visual rows attend nothing
        row_live = row_live & ~row_vis
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    vis_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    idx_base = b * stride_idx_b + pid_m * stride_idx_m
    for i in range(0, n_full):
        start_n = tl.load(FullIdx + idx_base + i) * BLOCK_N
        acc, m_i, l_i, vis_i = _tile_step(
            q, acc, m_i, l_i, vis_i, k_base, v_base, kind_base, start_n, qpos, row_live, row_vis,
            stride_kn, stride_kd, stride_vn, stride_vd, Nk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, POLICY, VISUAL_SELF, WANT_MASS, DOT_PRECISION, DOT_F32,
        )
        if COUNT_TILES:
            tl.atomic_add(Counter, 1)
    for i in range(0, n_part):
        start_n = tl.load(PartIdx + idx_base + i) * BLOCK_N
        acc, m_i, l_i, vis_i = _tile_step(
            q, acc, m_i, l_i, vis_i, k_base, v_base, kind_base, start_n, qpos, row_live, row_vis,
            stride_kn, stride_kd, stride_vn, stride_vd, Nk, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, POLICY, VISUAL_SELF, WANT_MASS, DOT_PRECISION, DOT_F32,
        )
        if COUNT_TILES:
            tl.atomic_add(Counter, 1)

    empty = l_i == 0.0  # no allowed key: out 0, mass 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    # where, not just l_safe: 0 * NaN in P @ V would leak a NaN/inf value into empty rows.
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    o_ptrs = Out + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    stat_off = pid_bh.to(tl.int64) * Nq + offs_m
    if WANT_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2_C)
        tl.store(Lse + stat_off, lse, mask=m_ok)
    if WANT_MASS:
        tl.store(Mass + stat_off, vis_i / l_safe, mask=m_ok)
