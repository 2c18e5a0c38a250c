"""Triton kernel of modality-aware attention on a *paged* KV cache (the vLLM backend's GPU path).

Same layout and contract as ``torch_paged.paged_attention_torch``: packed queries
``q`` [T, Hq, D] (request r owns rows ``query_start_loc[r]:query_start_loc[r + 1]``, the last
of its ``seq_lens[r]`` positions), caches [num_blocks, Hkv, block_size, D] addressed through
``block_table`` [R, max_blocks], per-slot token kinds ``slot_kinds`` int8 [num_blocks * block_size].

Grid and tiles: one program per (query tile of one request, KV head, head chunk). The rows of
a tile are (query token, query head) pairs, token-major: ``heads = min(G, BLOCK_M)`` query
heads of the KV head's GQA group of G (a chunk of them when G > BLOCK_M) times
``BLOCK_M // heads`` consecutive query tokens. A block's K and V are loaded once for the whole
group, and a decode token fills G rows of a 16-row tile. BLOCK_M is 16 (the decode tile, 4
warps) unless the batch's longest query chunk fills a prefill tile of ``prefill_rows()`` (64
rows at D <= 64, 128 at D <= 128, one warp per 16 rows; none at D = 256 or for fp32).

A key tile is a cache block, or a part of one (TILE_N keys: fp32's FMA dots and the prefill
tiles at larger blocks take 16 or 32). The block-table entry and the tile's kinds are read one
iteration ahead; from the kinds and three per-tile scalars (the last live row, the last live
text row, the tile's token range) the program decides whether any row may attend any key of
the tile, and a tile with no allowed entry is skipped before its K and V are loaded — under
``vskip`` a tile of visual query rows never loads blocks of visual keys other than its own,
and ``frozen`` visual-only tiles load nothing. The mask of a processed tile is
reference.allowed_mask regrouped as three position limits per row (see ``lim_all`` below;
``triton_masks.policy_allowed`` spells the same rule elementwise), then an online softmax in
log2 units; with 16-row tiles the row sums are kept per column and reduced after the loop
(``DEFER_SUM``), which saves a cross-warp reduction per tile.

Under ``count_tiles()`` each (query tile, cache block) pair with a processed key tile adds,
once, the number of query heads the tile serves: the total is the live (tile of
``tile_tokens()`` query tokens, block) pairs x Hq.

Addressing: 64-bit only where a product can pass 2**31 (the token rows of Q and Out, a
block's base ``block * stride_kb``); the offsets inside a block are 32-bit and loop-invariant,
the loop's key position is a carried 32-bit scalar.

Specialisation (what ``aot_specs`` must declare to compile the kernel that runs): Out is
allocated contiguous and Q made so in the rare case its strides are not, so their row strides
(``stride_qt``, ``stride_ot``, in ``common.ALIGNED_INTS`` with the cache strides) are
multiples of 16 whenever the head dim is; the group size, the tile's head count and the
block-table stride are never specialised, so one compiled kernel serves every model and batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kinds import POLICY_CODES
from ..dispatch import interpreter_on
from ..pytorch.paged import check_paged_args
from .common import (
    DTYPES,
    LOG2E,
    aot_spec,
    block_d_for,
    check_supported,
    checked_counter,
    compilable,
)
from .masks import FROZEN, PAD, TEXT, VISUAL, VSKIP
from .spec import AotSpec, register_specs

BLOCK_SIZES = (16, 32, 64)  # cache block sizes the kernel serves
DECODE_ROWS = 16  # BLOCK_M of the decode tile (the prefill tile's is prefill_rows())


# Runtime ints Triton must not specialise (on == 1 or on 16-divisibility): the group size and
# the tile's head count vary with the model, and the block-table row stride with the batch, so
# one compiled kernel serves them all, as the AOT specs declare it.
@triton.jit(do_not_specialize=["stride_bt", "GROUP", "HEADS"])
def paged_attn_kernel(
    Q, KC, VC, Out, BlockTable, SeqLens, QStart, SlotKinds, TileReq, TileTok, Counter,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ot, stride_oh, stride_bt, GROUP, HEADS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_N: tl.constexpr, DEFER_SUM: tl.constexpr, POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr,
    COUNT_TILES: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, PTX: tl.constexpr,
):
    tile = tl.program_id(0)
    chunks = tl.cdiv(GROUP, HEADS)
    kvh = tl.program_id(1) // chunks
    h0 = (tl.program_id(1) % chunks) * HEADS  # first query head (in the group) of the tile
    block_q = BLOCK_M // HEADS  # query tokens per tile
    r = tl.load(TileReq + tile)
    t0 = tl.load(TileTok + tile)  # the tile's first query token, counted in its request
    q0 = tl.load(QStart + r)
    n_q = tl.load(QStart + r + 1) - q0
    seq = tl.load(SeqLens + r)
    p0 = seq - n_q  # key position of the request's first query token

    # rows: (token t0 + i // HEADS, head h0 + i % HEADS)
    offs_m = tl.arange(0, BLOCK_M)
    tok = t0 + offs_m // HEADS
    hh = h0 + offs_m % HEADS
    row_ok = (offs_m < block_q * HEADS) & (tok < n_q) & (hh < GROUP)
    head = kvh * GROUP + hh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    trow = (q0 + tok).to(tl.int64)
    q = tl.load(Q + trow[:, None] * stride_qt + (head * stride_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    qpos = p0 + tok
    bt = BlockTable + r.to(tl.int64) * stride_bt
    q_blk = tl.load(bt + qpos // BLOCK_N, mask=row_ok, other=0)
    qkind = tl.load(SlotKinds + q_blk * BLOCK_N + qpos % BLOCK_N, mask=row_ok, other=0)
    row_vis = qkind == VISUAL
    row_live = row_ok & (qkind != PAD)
    if POLICY == FROZEN:  # frozen: visual rows attend nothing
        row_live = row_live & ~row_vis
    # The policy mask as three position limits per row (-1: none), so that inside the loop
    # allowed[i, k] = (real key k <= lim_all[i]) | (text key k <= lim_text[i]) | (k == lim_self[i]):
    # it is reference.allowed_mask (= triton_masks.policy_allowed) regrouped by key kind.
    # vskip: text rows see every real key up to their own, visual rows the text keys and (with
    # VISUAL_SELF) the key at their own position, which is their own (visual, real) slot.
    if POLICY == VSKIP:
        lim_all = tl.where(row_live & ~row_vis, qpos, -1)
        lim_text = tl.where(row_live, qpos, -1)
        if VISUAL_SELF:
            lim_self = tl.where(row_live & row_vis, qpos, -1)
    else:
        lim_all = tl.where(row_live, qpos, -1)
    # The block skip uses the same limits per tile: the largest of each, and the tile's
    # token positions (a visual key there is a visual row's own key).
    last_all = tl.max(lim_all, 0)
    last = last_all
    if POLICY == VSKIP:
        last_text = tl.max(lim_text, 0)
        last = last_text
        if VISUAL_SELF:
            first_tok = p0 + t0
            last_tok = p0 + tl.minimum(t0 + block_q, n_q) - 1
    n_heads = tl.minimum(HEADS, GROUP - h0)  # query heads this tile serves

    kh_base = KC + kvh * stride_kh
    vh_base = VC + kvh * stride_vh
    offs_t = tl.arange(0, TILE_N)
    k_off = offs_t[:, None] * stride_kn + offs_d[None, :]  # 32-bit, inside one block
    v_off = offs_t[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if DEFER_SUM:
        l_part = tl.zeros([BLOCK_M, TILE_N], tl.float32)  # row sums, reduced once after the loop
    else:
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key tiles of TILE_N keys: the whole block, or a part of it (SUB tiles per block).
    SUB: tl.constexpr = BLOCK_N // TILE_N
    n_tiles = tl.cdiv(last + 1, TILE_N)
    # The block-table entry and kinds of key tile j are read one iteration ahead, so that a
    # tile's skip test does not wait on two dependent loads. (A request with a query row
    # holds at least one block, so entry 0 is always valid; the last iteration re-reads its own.)
    blk = tl.load(bt)
    kk = tl.load(SlotKinds + blk * BLOCK_N + offs_t)
    if COUNT_TILES:
        counted = -1  # the last block counted: a block counts once, however many of its tiles run
    k0 = 0  # first key position of tile j (32-bit, carried: no 64-bit induction variable)
    for j in range(0, n_tiles):
        j_n = tl.minimum(j + 1, n_tiles - 1)
        blk_n = tl.load(bt + j_n // SUB)
        kk_n = tl.load(SlotKinds + blk_n * BLOCK_N + (j_n % SUB) * TILE_N + offs_t)
        kpos = k0 + offs_t
        seen = (kk != PAD) & (kpos <= last_all)
        if POLICY == VSKIP:
            seen = seen | ((kk == TEXT) & (kpos <= last_text))
            if VISUAL_SELF:
                seen = seen | ((kk == VISUAL) & (kpos >= first_tok) & (kpos <= last_tok))
        if tl.max(seen.to(tl.int32), 0) > 0:
            in_blk = k0 % BLOCK_N  # the tile's first slot in its block
            k = tl.load(kh_base + blk.to(tl.int64) * stride_kb + in_blk * stride_kn + k_off,
                        mask=d_ok[None, :], other=0.0)
            # Keys past the sequence end are never allowed (p = 0), but their slots may hold
            # anything, NaN included: 0 * NaN must not reach the accumulator.
            v = tl.load(vh_base + blk.to(tl.int64) * stride_vb + in_blk * stride_vn + v_off,
                        mask=(kpos < seq)[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            tk = tl.load(SlotKinds + blk * BLOCK_N + in_blk + offs_t)  # the kinds again, in the score tile's layout
            allowed = tl.where(tk != PAD, kpos, 0x40000000)[None, :] <= lim_all[:, None]
            if POLICY == VSKIP:
                allowed = allowed | (tl.where(tk == TEXT, kpos, 0x40000000)[None, :] <= lim_text[:, None])
                if VISUAL_SELF:
                    allowed = allowed | (kpos[None, :] == lim_self[:, None])
            s = tl.where(allowed, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # nothing allowed yet: shift by 0 so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            if DEFER_SUM:
                l_part = l_part * alpha[:, None] + p
            else:
                l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            acc = acc * alpha[:, None]
            if DOT_F32:
                acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            if COUNT_TILES:
                if j // SUB != counted:
                    tl.atomic_add(Counter, n_heads)
                    counted = j // SUB
        blk = blk_n
        kk = kk_n
        k0 += TILE_N

    if DEFER_SUM:
        l_i = tl.sum(l_part, 1)
    # Out is zeros already: rows with no allowed key (l = 0; every row outside the tile, whose
    # row_live is false, among them) are not stored and stay exact zeros. A NaN sum is stored.
    has = l_i != 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if PTX:
        # The rows' output offsets derived again, from an opaque copy of the row index that
        # the compiler cannot merge with the one before the loop: kept live across the loop
        # instead, ptxas may spill them around it (seen with fp32's FMA dots).
        rows = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [offs_m], dtype=tl.int32, is_pure=False, pack=1)
        orow = (q0 + t0 + rows // HEADS).to(tl.int64) * stride_ot + (kvh * GROUP + h0 + rows % HEADS) * stride_oh
    else:  # Triton's interpreter runs no inline PTX
        orow = trow * stride_ot + head * stride_oh
    tl.store(Out + orow[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=has[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- tiling


def prefill_rows(dtype: str, head_dim: int) -> int | None:
    """BLOCK_M of the prefill tile, or None where only the decode tile is compiled.

    Its warps split the rows (16 each), which Triton's MMA layout does for chained dots only
    when the tile has at least as many rows as the head dim: 64 rows up to D=64, 128 up to
    D=128. None for D=256 (its accumulator would not fit) and fp32 (FMA dots)."""
    bd = block_d_for(head_dim)
    if dtype == "fp32" or bd > 128:
        return None
    return max(64, bd)


def tile_rows(dtype: str, head_dim: int, group: int, max_query_len: int) -> int:
    """BLOCK_M of a launch: the prefill tile once the longest query chunk fills one (its
    tokens x the group's heads), else the 16-row decode tile."""
    rows = prefill_rows(dtype, head_dim)
    if rows is not None and max_query_len * min(group, rows) >= rows:
        return rows
    return DECODE_ROWS


def tile_heads(group: int, block_m: int) -> int:
    """Query heads per tile: the whole GQA group when it fits the tile's rows."""
    return min(group, block_m)


def tile_tokens(group: int, block_m: int) -> int:
    """Query tokens per tile (BLOCK_M // heads)."""
    return block_m // tile_heads(group, block_m)


def kernel_config(dtype: str, head_dim: int, block_size: int, block_m: int) -> dict:
    """Launch options and tile constexprs of one compiled configuration: num_warps, num_stages,
    TILE_N (keys per loop step: the block, or a part of it where registers demand) and
    DEFER_SUM (row sums kept per column and reduced after the loop, saving a cross-warp
    reduction per step where the warps split the key tile, as in the 16-row tile).

    Chosen so that no configuration spills on sm80/86/89/90 under any policy (``aot_specs``
    registers the largest, vskip with VISUAL_SELF)."""
    bd = block_d_for(head_dim)
    if dtype == "fp32":  # FMA dots hold whole operand rows in registers: small key tiles
        return dict(num_warps=8 if bd > 128 else 4, num_stages=2, TILE_N=min(block_size, 32) if bd <= 64 else 16,
                    DEFER_SUM=False)
    if block_m == DECODE_ROWS:
        return dict(num_warps=4, num_stages=2, TILE_N=16 if bd > 128 and block_size > 32 else block_size,
                    DEFER_SUM=True)
    return dict(num_warps=block_m // 16, num_stages=2, TILE_N=min(block_size, 32) if bd <= 64 else 16,
                DEFER_SUM=False)


def _query_tiles(qsl: torch.Tensor, num_reqs: int, block_q: int, device):
    """(request index, first token) of every query tile of ``block_q`` tokens, as int32 tensors."""
    lens = (qsl[1:] - qsl[:-1]).clamp_min(0)
    per = (lens + block_q - 1) // block_q
    req = torch.repeat_interleave(torch.arange(num_reqs), per)
    first = torch.cumsum(per, 0) - per
    tok = (torch.arange(int(per.sum())) - torch.repeat_interleave(first, per)) * block_q
    return req.to(device, torch.int32), tok.to(device, torch.int32)


def paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, slot_kinds, *,
                           policy: str = "vskip", softmax_scale: float | None = None, visual_self: bool = True,
                           num_reqs: int | None = None) -> torch.Tensor:
    """Triton twin of ``torch_paged.paged_attention_torch`` (same arguments); returns [T, Hq, D]."""
    check_paged_args(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, slot_kinds, policy)
    check_supported("paged triton attention", q.dtype, q.shape[-1])
    if q.device.type != "cuda" and not interpreter_on():
        raise ValueError(f"paged_attention_triton needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
                         "or use paged_attention_torch")
    bs = k_cache.shape[2]
    if bs not in BLOCK_SIZES:
        raise ValueError(f"k_cache block_size must be one of {BLOCK_SIZES} for the Triton kernel, got {bs}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dimension")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache dtype ({k_cache.dtype}/{v_cache.dtype}) must match q's ({q.dtype})")
    nreq = block_table.shape[0] if num_reqs is None else int(num_reqs)
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    group = hq // hkv
    dtype = DTYPES[q.dtype]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # contiguous: row strides Hq * D and D
    qsl = query_start_loc[: nreq + 1].to("cpu", torch.int64)
    max_len = int((qsl[1:] - qsl[:-1]).max()) if nreq else 0
    if max_len <= 0:
        return out
    if d % 16 == 0 and (q.stride(0) % 16 or q.stride(1) % 16):
        q = q.contiguous()  # 16-divisible row strides: the compiled (and AOT-checked) kernel
    bm = tile_rows(dtype, d, group, max_len)
    heads = tile_heads(group, bm)
    req, tok = _query_tiles(qsl, nreq, tile_tokens(group, bm), q.device)
    bt = block_table[:nreq].to(torch.int32).contiguous()
    counter = checked_counter(q.device)
    counting = counter is not None
    if not counting:
        counter = torch.empty(1, dtype=torch.int32, device=q.device)
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    cfg = kernel_config(dtype, d, bs, bm)
    grid = (req.numel(), hkv * triton.cdiv(group, heads))
    paged_attn_kernel[grid](
        q, k_cache, v_cache, out, bt, seq_lens[:nreq].to(torch.int32).contiguous(),
        query_start_loc[: nreq + 1].to(torch.int32).contiguous(), slot_kinds, req, tok, counter,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), bt.stride(0),
        group, heads, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d_for(d), BLOCK_M=bm, BLOCK_N=bs, TILE_N=cfg["TILE_N"],
        DEFER_SUM=cfg["DEFER_SUM"], POLICY=POLICY_CODES[policy],
        VISUAL_SELF=bool(visual_self), COUNT_TILES=counting,
        DOT_F32=dtype == "fp32" or (dtype == "bf16" and interpreter_on()),
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", PTX=not interpreter_on(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ----------------------------------------------------------------------------- AOT specs
_PTR_NAMES = ("Q", "KC", "VC", "Out")


def _signature(dtype: str) -> dict:
    sig = {n: f"*{dtype}" for n in _PTR_NAMES}
    sig.update({"BlockTable": "*i32", "SeqLens": "*i32", "QStart": "*i32", "SlotKinds": "*i8", "TileReq": "*i32",
                "TileTok": "*i32", "Counter": "*i32"})
    for name in ("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
                 "stride_vn", "stride_ot", "stride_oh", "stride_bt", "GROUP", "HEADS"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    for name in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "TILE_N", "DEFER_SUM", "POLICY", "VISUAL_SELF",
                 "COUNT_TILES", "DOT_F32", "DOT_PRECISION", "PTX"):
        sig[name] = "constexpr"
    return sig


# One head dim per compiled kernel: BLOCK_D 64, 128 with and without the head-dim mask
# (D=96 stands for 80 and 96), 256.
AOT_HEAD_DIMS = (64, 96, 128, 256)


def aot_configs() -> list[tuple[str, int, int, int]]:
    """(dtype, head dim, block size, BLOCK_M) of every kernel the launcher compiles."""
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for d in AOT_HEAD_DIMS:
            rows = [DECODE_ROWS] + [r for r in (prefill_rows(dtype, d),) if r is not None]
            out += [(dtype, d, bs, bm) for bs in BLOCK_SIZES for bm in rows]
    return out


@register_specs
def aot_specs() -> list[AotSpec]:
    """Every configuration the launcher can launch: dtype x head dim x block size x row tile,
    compiled for vskip with VISUAL_SELF (the largest code). The group size and the tile's
    head count are run-time arguments Triton does not specialise on, so they add none.
    """
    kernel = compilable(paged_attn_kernel)
    specs = []
    for dtype, d, bs, bm in aot_configs():
        cfg = kernel_config(dtype, d, bs, bm)
        specs.append(aot_spec(
            name=f"paged_{dtype}_d{d}_bs{bs}_m{bm}",
            fn=kernel,
            signature=_signature(dtype),
            constexprs={"HEAD_DIM": d, "BLOCK_D": block_d_for(d), "BLOCK_M": bm, "BLOCK_N": bs,
                        "TILE_N": cfg["TILE_N"], "DEFER_SUM": cfg["DEFER_SUM"],
                        "POLICY": 1, "VISUAL_SELF": True, "COUNT_TILES": False, "DOT_F32": dtype == "fp32",
                        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "PTX": True},
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        ))
    return specs
