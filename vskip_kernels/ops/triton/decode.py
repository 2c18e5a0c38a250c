"""Split-KV (flash-decoding) attention for a few queries against a long KV cache.

A decode step has one query per sequence (a handful with speculative or chunked
decoding), so the prefill kernel's grid of (sequence, head, query tile) would
leave most SMs idle while it walks a 32k cache. Here the query heads of one GQA
group (times the Nq queries) are packed as the rows of one tile, so each K/V tile
is read once per KV head, and the list of live key tiles is split among
num_splits programs. Each split leaves fp32 partials (normalised output, log2
LSE, visual share) that a second kernel merges with LSE weights.

The key tiles come from the same ``Schedule`` as the prefill kernel: a key tile
with no allowed entry for any of the queries is never loaded. Under
``triton_attention.count_tiles()`` each processed key tile adds the number of
query heads it served, so the count equals the prefill kernel's convention
(live (query tile, key tile) pairs x Hq).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kinds import POLICY_CODES
from ...schedule import Schedule
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
    FROZEN,
    PAD,
    VISUAL,
    lse_merge_step,
    masked_softmax_step,
    policy_allowed,
)
from .spec import AotSpec, register_specs

# Decode rows are (query head, query) pairs of one KV head; more than this many
# rows are spread over several programs (row blocks) that each re-read K/V.
MAX_DECODE_QUERIES = 16
# Interpreter runs use a small fixed split count so tests cross split boundaries.
CPU_SPLITS = 4
MERGE_ROWS = 16


def use_decode_path(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Few queries against the cache: one query tile per head could not fill the GPU."""
    return q.shape[2] <= MAX_DECODE_QUERIES


def _num_warps(block_r: int, block_d: int) -> int:
    return 8 if block_r * block_d >= 64 * 128 else 4


def num_splits(batch_programs: int, max_tiles: int, device: torch.device) -> int:
    """Splits per (sequence, KV head, row block): about two waves of programs, at
    least one key tile each."""
    return split_count(batch_programs, max_tiles, device, CPU_SPLITS)


def _union_lists(schedule: Schedule):
    """(full_cnt, full_idx, part_cnt, part_idx) with one row per sequence.

    With a single query tile (always so for Nq <= block_m) these are the schedule's
    own lists. Otherwise the decode tile holds several query tiles, so it visits
    the union of their key tiles, all masked per element.
    """
    if schedule.num_m_tiles == 1:
        return schedule.full_cnt[:, 0], schedule.full_idx[:, 0], schedule.part_cnt[:, 0], schedule.part_idx[:, 0]
    live = schedule.live_mask().any(1)
    cnt = live.sum(-1, dtype=torch.int32)
    idx = torch.sort(live.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return torch.zeros_like(cnt), torch.zeros_like(idx), cnt, idx.contiguous()


@triton.jit
def _decode_split_kernel(
    Q, K, V, KIND, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    O_PART, LSE_PART, VIS_PART,
    OUT, MASS, LSE, CNT,
    sm_scale_log2, n_kv_heads, group, nq, nk, head_dim, tile_n, heads_per_block, n_row_blocks, num_splits,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_kind, stride_cnt, stride_idx,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr,
    WANT_MASS: tl.constexpr, DIRECT: tl.constexpr, COUNT_TILES: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % n_row_blocks
    bh = pid // n_row_blocks
    # 64-bit offsets: a batch of long caches passes 2**31 elements.
    b = (bh // n_kv_heads).to(tl.int64)
    hkv = (bh % n_kv_heads).to(tl.int64)

    # Rows are whole heads (heads_per_block of them, nq rows each), so each query
    # head's tile pairs are counted once even when the group spans row blocks.
    lr = tl.arange(0, BLOCK_R)
    g = rb * heads_per_block + lr // nq
    qi = lr % nq
    row_ok = (lr < heads_per_block * nq) & (g < group)
    qpos = nk - nq + qi
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    qkind = tl.load(KIND + b * stride_kind + qpos, mask=row_ok, other=0)
    row_live = row_ok & (qkind != PAD)
    if POLICY == FROZEN:
        row_live = row_live & (qkind != VISUAL)
    row_vis = qkind == VISUAL

    head = hkv * group + g
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    kind_base = KIND + b * stride_kind

    fc = tl.load(FULL_CNT + b * stride_cnt)
    total = fc + tl.load(PART_CNT + b * stride_cnt)
    per_split = (total + num_splits - 1) // num_splits
    start = split * per_split
    end = tl.minimum(start + per_split, total)
    n_heads_here = tl.minimum(heads_per_block, group - rb * heads_per_block)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    vis_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for t in range(start, end):
        in_full = t < fc
        n_full = tl.load(FULL_IDX + b * stride_idx + t, mask=in_full, other=0)
        n_part = tl.load(PART_IDX + b * stride_idx + t - fc, mask=t >= fc, other=0)
        tile = tl.where(in_full, n_full, n_part)
        if COUNT_TILES:
            tl.atomic_add(CNT, n_heads_here)
        # Decode is bound by K/V traffic, so full tiles take the masked path too.
        for sub in range(0, tile_n, BLOCK_N):
            offs_n = tile * tile_n + sub + tl.arange(0, BLOCK_N)
            n_ok = offs_n < nk
            kk = tl.load(kind_base + offs_n, mask=n_ok, other=0)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * sm_scale_log2
            allowed = policy_allowed(offs_n, kk, qpos, row_live, row_vis, POLICY, VISUAL_SELF)
            p, alpha, m_new, l_i, vis_i = masked_softmax_step(s, allowed, kk, m_i, l_i, vis_i, WANT_MASS)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                # p is still rounded to v's dtype, as the tensor-core path does.
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
                acc = acc * alpha[:, None] + pv
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    # != rather than >: a NaN running sum must stay NaN, not pass for an empty row
    has = l_i != 0.0
    l_safe = tl.where(has, l_i, 1.0)
    # where, not just l_safe: 0 * NaN in P @ V would leak a NaN/inf value into empty rows.
    o = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse2 = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
    frac = vis_i / l_safe
    if DIRECT:
        o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        stat = (b * n_kv_heads * group + head) * nq + qi
        tl.store(LSE + stat, lse2 * 0.6931471805599453, mask=row_ok)
        if WANT_MASS:
            tl.store(MASS + stat, frac, mask=row_ok)
    else:
        # partials: [B * Hkv, num_splits, group * nq (, head_dim)], row = g * nq + i
        prow = (bh * num_splits + split) * (group * nq) + g * nq + qi
        tl.store(O_PART + prow[:, None] * head_dim + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + prow, lse2, mask=row_ok)
        if WANT_MASS:
            tl.store(VIS_PART + prow, frac, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, VIS_PART, OUT, MASS, LSE,
    n_kv_heads, group, nq, head_dim, num_splits,
    stride_ob, stride_oh, stride_on,
    BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, WANT_MASS: tl.constexpr,
):
    bh = tl.program_id(0)
    rows = group * nq
    row = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # g * nq + i
    row_ok = row < rows
    b = (bh // n_kv_heads).to(tl.int64)
    head = (bh % n_kv_heads).to(tl.int64) * group + row // nq
    qi = row % nq
    offs_d = tl.arange(0, BLOCK_D)
    mask2 = row_ok[:, None] & (offs_d < head_dim)[None, :]

    # Online LSE merge over the splits: no reduction over a split axis, so any
    # split count works with one compiled kernel.
    top = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    vis = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    base = bh * num_splits * rows + row
    for s in range(0, num_splits):
        lse_s = tl.load(LSE_PART + base + s * rows, mask=row_ok, other=float("-inf"))
        alpha, w, new_top = lse_merge_step(top, lse_s)
        o_s = tl.load(O_PART + (base + s * rows)[:, None] * head_dim + offs_d[None, :], mask=mask2, other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        w_sum = w_sum * alpha + w
        if WANT_MASS:
            vis = vis * alpha + w * tl.load(VIS_PART + base + s * rows, mask=row_ok, other=0.0)
        top = new_top
    has = w_sum != 0.0  # NaN partials propagate instead of being dropped as empty
    w_safe = tl.where(has, w_sum, 1.0)
    o_ptrs = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, (acc / w_safe[:, None]).to(OUT.dtype.element_ty), mask=mask2)
    stat = (b * n_kv_heads * group + head) * nq + qi
    tl.store(LSE + stat, tl.where(has, top + tl.log2(w_safe), float("-inf")) * 0.6931471805599453, mask=row_ok)
    if WANT_MASS:
        tl.store(MASS + stat, vis / w_safe, mask=row_ok)


def _row_block(group: int, nq: int, dtype: str) -> tuple[int, int]:
    """(BLOCK_R, heads per row block): the smallest row block holding the whole
    group, else the largest one holding as many whole heads as fit."""
    block_r = row_block_for(group * nq, dtype)
    return block_r, min(group, block_r // nq)


def decode_forward(q, k, v, schedule: Schedule, softmax_scale: float, want_mass: bool, want_lse: bool):
    """q [B, Hq, Nq, D] (the last Nq of Nk positions), k/v [B, Hkv, Nk, D].

    Returns (out [B, Hq, Nq, D] in q's dtype, visual mass fp32 [B, Hq, Nq] or None,
    lse fp32 [B, Hq, Nq] or None).
    """
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    check_supported("decode attention", q.dtype, d)
    dtype = DTYPES[q.dtype]
    if nq > row_blocks(dtype)[-1]:
        raise ValueError(f"decode attention takes at most {row_blocks(dtype)[-1]} {q.dtype} queries, got Nq={nq}")
    if (schedule.nq, schedule.nk, schedule.kind.shape[0]) != (nq, nk, bsz):
        raise ValueError(f"schedule was planned for B={schedule.kind.shape[0]}, Nq={schedule.nq}, "
                         f"Nk={schedule.nk}; got B={bsz}, Nq={nq}, Nk={nk}")
    group = hq // hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kind = schedule.kind if schedule.kind.stride(-1) == 1 else schedule.kind.contiguous()
    full_cnt, full_idx, part_cnt, part_idx = (t.contiguous() for t in _union_lists(schedule))

    block_d = block_d_for(d)
    block_n = min(split_block_n(block_d, dtype), schedule.block_n)
    block_r, heads_per_block = _row_block(group, nq, dtype)
    n_row_blocks = triton.cdiv(group, heads_per_block)
    programs = bsz * hkv * n_row_blocks
    splits = num_splits(programs, schedule.num_n_tiles, q.device)

    out = torch.empty(bsz, hq, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device)
    mass = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device) if want_mass else lse
    direct = splits == 1
    if direct:
        o_part = lse_part = vis_part = lse
    else:
        o_part = torch.empty(bsz * hkv, splits, group * nq, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(bsz * hkv, splits, group * nq, dtype=torch.float32, device=q.device)
        vis_part = torch.empty_like(lse_part) if want_mass else lse_part
    counter = checked_counter(q.device)

    _decode_split_kernel[(programs, splits)](
        q, k, v, kind, full_cnt, full_idx, part_cnt, part_idx,
        o_part, lse_part, vis_part, out, mass, lse, counter if counter is not None else full_cnt,
        softmax_scale * LOG2E, hkv, group, nq, nk, d, schedule.block_n, heads_per_block, n_row_blocks, splits,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kind.stride(0), full_cnt.stride(0), full_idx.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        POLICY=POLICY_CODES[schedule.policy], VISUAL_SELF=bool(schedule.visual_self),
        WANT_MASS=bool(want_mass), DIRECT=direct, COUNT_TILES=counter is not None,
        F32_DOT=f32_dot(q.dtype), num_warps=_num_warps(block_r, block_d), num_stages=2,
    )
    if not direct:
        rows = group * nq
        _decode_merge_kernel[(bsz * hkv, triton.cdiv(rows, MERGE_ROWS))](
            o_part, lse_part, vis_part, out, mass, lse,
            hkv, group, nq, d, splits,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_D=block_d, BLOCK_ROWS=MERGE_ROWS, WANT_MASS=bool(want_mass), num_warps=4,
        )
    return out, (mass if want_mass else None), (lse if want_lse else None)


def _split_signature(dt: str) -> dict:
    return kernel_signature(
        dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", KIND="*i8", FULL_CNT="*i32", FULL_IDX="*i32", PART_CNT="*i32",
             PART_IDX="*i32", O_PART="*fp32", LSE_PART="*fp32", VIS_PART="*fp32", OUT=f"*{dt}", MASS="*fp32",
             LSE="*fp32", CNT="*i32", sm_scale_log2="fp32"),
        i32=("n_kv_heads", "group", "nq", "nk", "head_dim", "tile_n", "heads_per_block", "n_row_blocks", "num_splits",
             "stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
             "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_on",
             "stride_kind", "stride_cnt", "stride_idx"),
        constexpr=("BLOCK_R", "BLOCK_N", "BLOCK_D", "POLICY", "VISUAL_SELF", "WANT_MASS", "DIRECT", "COUNT_TILES",
                   "F32_DOT"))


def _merge_signature(dt: str) -> dict:
    return kernel_signature(
        dict(O_PART="*fp32", LSE_PART="*fp32", VIS_PART="*fp32", OUT=f"*{dt}", MASS="*fp32", LSE="*fp32"),
        i32=("n_kv_heads", "group", "nq", "head_dim", "num_splits", "stride_ob", "stride_oh", "stride_on"),
        constexpr=("BLOCK_D", "BLOCK_ROWS", "WANT_MASS"))


@register_specs
def aot_specs() -> list[AotSpec]:
    """Every tile shape the decode kernels launch with.

    The head dim is a runtime mask bound, so one compiled kernel per padded width
    (BLOCK_D 64: d64; 128: d80/96/128; 256: d256) serves every head dim. Shared
    memory depends on the element width and tile shapes, not the element type, so
    fp16 covers every row block and bf16 (as wide as fp16) is compiled once per
    width at the larger row block to catch bf16-only lowering problems; fp32 (row
    block 16 only) once at its largest tile. The policy/mask constexprs only add or
    drop elementwise ops and are compiled at their heaviest setting (vskip with
    self, mass on, counting on). The split count is a run-time argument; the small
    row block is compiled with the direct epilogue (one split), the large one with
    partials.
    """
    specs = []
    for dt in ("fp16", "bf16", "fp32"):
        for block_d in BLOCK_DS if dt != "fp32" else BLOCK_DS[-1:]:
            blocks = row_blocks(dt) if dt == "fp16" else row_blocks(dt)[-1:]
            for block_r in blocks:
                direct = block_r == ROW_BLOCKS[0] and dt == "fp16"
                specs.append(aot_spec(
                    name=f"decode_split_{dt}_bd{block_d}_r{block_r}_{'direct' if direct else 'split'}",
                    fn=_decode_split_kernel, signature=_split_signature(dt),
                    constexprs=dict(BLOCK_R=block_r, BLOCK_N=split_block_n(block_d, dt), BLOCK_D=block_d,
                                    POLICY=1, VISUAL_SELF=True, WANT_MASS=True,
                                    DIRECT=direct, COUNT_TILES=True, F32_DOT=dt == "fp32"),
                    num_warps=_num_warps(block_r, block_d), num_stages=2,
                ))
        # The merge keeps nothing in shared memory; the dtype only changes the final cast.
        for block_d in BLOCK_DS if dt == "fp16" else BLOCK_DS[-1:]:
            specs.append(aot_spec(
                name=f"decode_merge_{dt}_bd{block_d}",
                fn=_decode_merge_kernel, signature=_merge_signature(dt),
                constexprs=dict(BLOCK_D=block_d, BLOCK_ROWS=MERGE_ROWS, WANT_MASS=True),
                num_warps=4,
            ))
    return specs
