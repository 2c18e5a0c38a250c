"""Visual attention mass (FlashVLM's A_v) in one pass, without values or an N x N buffer.

For each selected query the kernel runs the online softmax of the attention
kernels (running max, total sum) and rescales a third running sum, the
probability on visual keys, with the same factors; V is never read. Rows are
(query, query head) pairs of one KV head, so the heads of a GQA group share
every K load. When there are few rows (the newest token against a long cache)
the key range is split among programs whose partial (log2 LSE, visual share)
pairs a second kernel merges.

Key blocks that cannot hold an allowed entry for any row of a row block are
skipped before K is loaded, from a per-key-block summary (first real and first
text position) computed once per call: blocks past every row's causal limit,
non-text blocks for rows that only see text (vskip visual queries, except the
block holding a row's own position), everything for rows with no allowed key.
Under ``triton_attention.count_tiles()`` each processed (row block, key block)
pair adds 1; ``tile_plan`` gives the block sizes to derive the expected count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kinds import KIND_PAD, KIND_TEXT, POLICY_CODES
from .common import (
    BLOCK_DS,
    DTYPES,
    LOG2E,
    ROW_BLOCKS,
    aot_spec,
    block_d_for,
    check_supported,
    checked_counter,
    f32_dot,
    kernel_signature,
    row_block_for,
    row_blocks,
    split_block_n,
    split_count,
)
from .masks import (
    DENSE,
    PAD,
    TEXT,
    VISUAL,
    VSKIP,
    lse_merge_step,
    masked_softmax_step,
    policy_allowed,
)
from .spec import AotSpec, register_specs

_BIG = 1 << 30
CPU_SPLITS = 3  # interpreter: a small fixed split count so tests cross split boundaries
MERGE_ROWS = 64
# Warps of the split kernel. Measured (ptxas -v, sm80-sm90): with 4 warps some (dtype, width,
# row block) spill even well below 255 registers (fp16/bf16 width 64 with 64 rows on sm80:
# 12 bytes at 168 registers; fp32 width 256 on sm86/89: 4 bytes at 96; fp32 width 128: 64-108
# bytes); with 8 warps every one compiles without spills or local memory on every target,
# both epilogues, and the per-SM warp count stays about the same.
SPLIT_WARPS = 8


def num_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    """Key-range splits per row block: about two waves of programs in all."""
    return split_count(programs, key_blocks, device, CPU_SPLITS)


def key_block_summary(kind: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first_real, first_text) int32 [B, Nt]: first non-padding / text position of
    each key block, or 2**30 when it has none."""
    b, nk = kind.shape
    nt = triton.cdiv(nk, block_n)
    padded = torch.zeros(b, nt * block_n, dtype=torch.int8, device=kind.device)
    padded[:, :nk] = kind
    blocks = padded.view(b, nt, block_n)
    pos = torch.arange(nt * block_n, dtype=torch.int32, device=kind.device).view(1, nt, block_n)
    big = torch.full_like(pos, _BIG)
    first_real = torch.where(blocks != KIND_PAD, pos, big).amin(-1).to(torch.int32)
    first_text = torch.where(blocks == KIND_TEXT, pos, big).amin(-1).to(torch.int32)
    return first_real.contiguous(), first_text.contiguous()


@triton.jit
def _mass_split_kernel(
    Q, K, KIND, QPOS, FIRST_REAL, FIRST_TEXT, LSE_PART, VIS_PART, MASS, CNT,
    sm_scale_log2, n_kv_heads, group, n_sel, nk, head_dim, n_row_blocks, num_splits,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_kind, stride_sum,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr, DIRECT: tl.constexpr, COUNT_TILES: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % n_row_blocks
    bh = pid // n_row_blocks
    b = (bh // n_kv_heads).to(tl.int64)
    hkv = (bh % n_kv_heads).to(tl.int64)

    # row r = selected query (r // group) x head of the group (r % group)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < n_sel * group
    sel = r // group
    g = r % group
    head = hkv * group + g
    qpos = tl.load(QPOS + sel, mask=row_ok, other=0)
    qkind = tl.load(KIND + b * stride_kind + qpos, mask=row_ok, other=0)
    is_vis = qkind == VISUAL
    if POLICY == DENSE:
        unrestricted = row_ok & (qkind != PAD)
    else:
        unrestricted = row_ok & (qkind == TEXT)
    if POLICY == VSKIP:
        restricted = row_ok & is_vis
    else:
        restricted = tl.full([BLOCK_M], 0, tl.int1)  # only vskip restricts visual rows
    row_live = unrestricted | restricted
    max_u = tl.max(tl.where(unrestricted, qpos, -1), 0)
    max_r = tl.max(tl.where(restricted, qpos, -1), 0)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + sel[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    kind_base = KIND + b * stride_kind
    sum_base = b * stride_sum

    # Key blocks past the block's last allowed position are never visited or split.
    hi = (tl.maximum(max_u, max_r) + BLOCK_N) // BLOCK_N
    per_split = (hi + num_splits - 1) // num_splits
    start = split * per_split
    end = tl.minimum(start + per_split, hi)
    if POLICY == VSKIP and VISUAL_SELF:
        lo_r = tl.min(tl.where(restricted, qpos, 1 << 30), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    vis_i = tl.zeros([BLOCK_M], tl.float32)
    for blk in range(start, end):
        n0 = blk * BLOCK_N
        need = (max_u >= tl.load(FIRST_REAL + sum_base + blk)) | (max_r >= tl.load(FIRST_TEXT + sum_base + blk))
        if POLICY == VSKIP and VISUAL_SELF:
            # A visual row sees its own (visual) key: only that row's own block.
            if (n0 <= max_r) & (n0 + BLOCK_N > lo_r):
                own = restricted & (qpos >= n0) & (qpos < n0 + BLOCK_N)
                need = need | (tl.max(own.to(tl.int32), 0) > 0)
        if need:
            if COUNT_TILES:
                tl.atomic_add(CNT, 1)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < nk
            kk = tl.load(kind_base + offs_n, mask=n_ok, other=0)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if F32_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * sm_scale_log2
            allowed = policy_allowed(offs_n, kk, qpos, row_live, restricted, POLICY, VISUAL_SELF)
            _, _, m_new, l_i, vis_i = masked_softmax_step(s, allowed, kk, m_i, l_i, vis_i, True)
            m_i = m_new

    has = l_i != 0.0  # a NaN running sum must stay NaN, not pass for an empty row
    l_safe = tl.where(has, l_i, 1.0)
    frac = vis_i / l_safe
    if DIRECT:
        tl.store(MASS + ((b * n_kv_heads * group + head) * n_sel + sel), frac, mask=row_ok)
    else:
        prow = (bh * num_splits + split) * (n_sel * group) + r
        tl.store(LSE_PART + prow, tl.where(has, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
        tl.store(VIS_PART + prow, frac, mask=row_ok)


@triton.jit
def _mass_merge_kernel(
    LSE_PART, VIS_PART, MASS, n_kv_heads, group, n_sel, num_splits,
    BLOCK_ROWS: tl.constexpr,
):
    bh = tl.program_id(0)
    rows = n_sel * group
    r = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = r < rows
    b = (bh // n_kv_heads).to(tl.int64)
    head = (bh % n_kv_heads).to(tl.int64) * group + r % group

    top = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    vis = tl.zeros([BLOCK_ROWS], tl.float32)
    base = bh * num_splits * rows + r
    for s in range(0, num_splits):
        lse_s = tl.load(LSE_PART + base + s * rows, mask=row_ok, other=float("-inf"))
        alpha, w, new_top = lse_merge_step(top, lse_s)
        vis = vis * alpha + w * tl.load(VIS_PART + base + s * rows, mask=row_ok, other=0.0)
        w_sum = w_sum * alpha + w
        top = new_top
    mass = vis / tl.where(w_sum != 0.0, w_sum, 1.0)  # same empty-row rule as the split kernel
    tl.store(MASS + ((b * n_kv_heads * group + head) * n_sel + r // group), mass, mask=row_ok)


def visual_mass(q, k, kind, q_pos, policy: str, visual_self: bool, softmax_scale: float) -> torch.Tensor:
    """fp32 [B, Hq, S]: share of each selected query's softmax on visual keys.

    q [B, Hq, S, D] (the selected queries), k [B, Hkv, Nk, D], kind int8 [B, Nk]
    (0 pad, 1 text, 2 visual), q_pos int32 [S]: key position of each selected query
    (any order). Rows with no allowed key give 0.
    """
    bsz, hq, n_sel, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    check_supported("visual mass", q.dtype, d)
    if tuple(kind.shape) != (bsz, nk) or kind.dtype != torch.int8:
        raise ValueError(f"kind must be int8 [B, Nk] = [{bsz}, {nk}], got {kind.dtype} {list(kind.shape)}")
    if q_pos.dim() != 1 or q_pos.numel() != n_sel:
        raise ValueError(f"q_pos must be a 1-D tensor of {n_sel} key positions, got shape {list(q_pos.shape)}")
    group = hq // hkv
    dtype = DTYPES[q.dtype]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    kind = kind.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()

    block_d = block_d_for(d)
    block_n = split_block_n(block_d, dtype)
    rows = n_sel * group
    block_m = row_block_for(rows, dtype)
    n_row_blocks = triton.cdiv(rows, block_m)
    n_key_blocks = triton.cdiv(nk, block_n)
    first_real, first_text = key_block_summary(kind, block_n)
    programs = bsz * hkv * n_row_blocks
    splits = num_splits(programs, n_key_blocks, q.device)

    mass = torch.empty(bsz, hq, n_sel, dtype=torch.float32, device=q.device)
    direct = splits == 1
    if direct:
        lse_part = vis_part = mass
    else:
        lse_part = torch.empty(bsz * hkv, splits, rows, dtype=torch.float32, device=q.device)
        vis_part = torch.empty_like(lse_part)
    counter = checked_counter(q.device)

    _mass_split_kernel[(programs, splits)](
        q, k, kind, q_pos, first_real, first_text, lse_part, vis_part, mass,
        counter if counter is not None else q_pos,
        softmax_scale * LOG2E, hkv, group, n_sel, nk, d, n_row_blocks, splits,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        kind.stride(0), first_real.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        POLICY=POLICY_CODES[policy], VISUAL_SELF=bool(visual_self), DIRECT=direct,
        COUNT_TILES=counter is not None, F32_DOT=f32_dot(q.dtype),
        num_warps=SPLIT_WARPS, num_stages=2,
    )
    if not direct:
        _mass_merge_kernel[(bsz * hkv, triton.cdiv(rows, MERGE_ROWS))](
            lse_part, vis_part, mass, hkv, group, n_sel, splits, BLOCK_ROWS=MERGE_ROWS, num_warps=2,
        )
    return mass


def tile_plan(kind: torch.Tensor, q_pos: torch.Tensor, group: int, dtype: torch.dtype, head_dim: int):
    """(block_m, block_n): the row and key block sizes ``visual_mass`` uses, for
    tests that count processed tiles."""
    dt = DTYPES[dtype]
    return row_block_for(q_pos.numel() * group, dt), split_block_n(block_d_for(head_dim), dt)


def _split_signature(dt: str) -> dict:
    return kernel_signature(
        dict(Q=f"*{dt}", K=f"*{dt}", KIND="*i8", QPOS="*i32", FIRST_REAL="*i32", FIRST_TEXT="*i32",
             LSE_PART="*fp32", VIS_PART="*fp32", MASS="*fp32", CNT="*i32", sm_scale_log2="fp32"),
        i32=("n_kv_heads", "group", "n_sel", "nk", "head_dim", "n_row_blocks", "num_splits",
             "stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_kn", "stride_kind", "stride_sum"),
        constexpr=("BLOCK_M", "BLOCK_N", "BLOCK_D", "POLICY", "VISUAL_SELF", "DIRECT", "COUNT_TILES", "F32_DOT"))


@register_specs
def aot_specs() -> list[AotSpec]:
    """Every tile shape the visual-mass kernels launch with.

    As in triton/decode.py: the head dim is a runtime mask bound (one kernel per padded
    width), and the mask constexprs are compiled at their heaviest setting (vskip with
    self blocks, counting on). Every (dtype, width, row block) is compiled: the small row
    block with partials (split), the large one with the direct epilogue, the case each
    serves most (the epilogues differ only in their last stores).
    """
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for block_d in BLOCK_DS:
            for block_m in row_blocks(dt):
                direct = block_m == ROW_BLOCKS[-1]
                specs.append(aot_spec(
                    name=f"mass_split_{dt}_bd{block_d}_m{block_m}_{'direct' if direct else 'split'}",
                    fn=_mass_split_kernel, signature=_split_signature(dt),
                    constexprs=dict(BLOCK_M=block_m, BLOCK_N=split_block_n(block_d, dt), BLOCK_D=block_d,
                                    POLICY=1, VISUAL_SELF=True, DIRECT=direct,
                                    COUNT_TILES=True, F32_DOT=dt == "fp32"),
                    num_warps=SPLIT_WARPS, num_stages=2,
                ))
    merge_sig = dict(LSE_PART="*fp32", VIS_PART="*fp32", MASS="*fp32", n_kv_heads="i32", group="i32",
                     n_sel="i32", num_splits="i32", BLOCK_ROWS="constexpr")
    specs.append(aot_spec(name="mass_merge", fn=_mass_merge_kernel, signature=merge_sig,
                         constexprs=dict(BLOCK_ROWS=MERGE_ROWS), num_warps=2))
    return specs
