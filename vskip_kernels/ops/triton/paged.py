"""Triton kernel of modality-aware attention on a *paged* KV cache (the vLLM backend's GPU path).

Same layout and contract as ``torch_paged.paged_attention_torch``: packed queries
``q`` [T, Hq, D] (request r owns rows ``query_start_loc[r]:query_start_loc[r + 1]``, the last
of its ``seq_lens[r]`` positions), caches [num_blocks, Hkv, block_size, D] addressed through
``block_table`` [R, max_blocks], per-slot token kinds ``slot_kinds`` int8 [num_blocks * block_size].

One program per (query tile of one request, query head). A key tile is one cache block. For
each block the program first loads the block's kinds (block_size bytes) and builds the policy
mask of its rows (``triton_masks.policy_allowed``, shared with the other kernels); a block
with no allowed entry is skipped before its K and V are loaded — under ``vskip`` a tile of
visual query rows never loads blocks of visual keys other than its own, and ``frozen``
visual-only tiles load nothing. The online softmax is ``triton_masks.masked_softmax_step``.
The count of processed (query tile, block) pairs goes to ``count_tiles()``.
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
from .masks import FROZEN, PAD, VISUAL, masked_softmax_step, policy_allowed
from .spec import AotSpec, register_specs

BLOCK_SIZES = (16, 32, 64)  # cache block sizes (one key tile each)


@triton.jit
def paged_attn_kernel(
    Q, KC, VC, Out, BlockTable, SeqLens, QStart, SlotKinds, TileReq, TileRow, Counter,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ot, stride_oh, stride_bt, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POLICY: tl.constexpr, VISUAL_SELF: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = (h // GROUP).to(tl.int64)
    r = tl.load(TileReq + tile).to(tl.int64)
    m0 = tl.load(TileRow + tile)
    q0 = tl.load(QStart + r)
    n_q = tl.load(QStart + r + 1) - q0
    seq = tl.load(SeqLens + r)
    p0 = seq - n_q

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h.to(tl.int64) * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = p0 + offs_m
    bt = BlockTable + r * stride_bt
    q_blk = tl.load(bt + qpos // BLOCK_N, mask=m_ok, other=0).to(tl.int64)
    qkind = tl.load(SlotKinds + q_blk * BLOCK_N + qpos % BLOCK_N, mask=m_ok, other=0)
    row_vis = qkind == VISUAL
    row_live = qkind != PAD
    if POLICY == FROZEN:  # frozen: visual rows attend nothing
        row_live = row_live & ~row_vis

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    vis_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = tl.minimum(seq, p0 + m0 + BLOCK_M)  # keys past the tile's last row are never allowed
    n_blocks = tl.cdiv(last, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_N)
    for j in range(0, n_blocks):
        phys = tl.load(bt + j).to(tl.int64)
        offs_n = j * BLOCK_N + offs_b
        kkind = tl.load(SlotKinds + phys * BLOCK_N + offs_b, mask=offs_n < seq, other=0)
        allowed = policy_allowed(offs_n, kkind, qpos, row_live, row_vis, POLICY, VISUAL_SELF)
        if tl.max(allowed.to(tl.int32)) > 0:
            kv_ok = (offs_n < seq)[:, None] & d_ok[None, :]
            k = tl.load(KC + phys * stride_kb + kvh * stride_kh + offs_b[:, None] * stride_kn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p, alpha, m_i, l_i, vis_i = masked_softmax_step(s * qk_scale, allowed, kkind, m_i, l_i, vis_i, False)
            v = tl.load(VC + phys * stride_vb + kvh * stride_vh + offs_b[:, None] * stride_vn + offs_d[None, :],
                        mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None]
            if DOT_F32:
                acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            if COUNT_TILES:
                tl.atomic_add(Counter, 1)

    empty = l_i == 0.0  # no allowed key: exact zeros
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    tl.store(Out + rows[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def block_m_for(dtype: str, head_dim: int) -> int:
    if dtype == "fp32":
        return 16
    return 64 if head_dim <= 128 else 32


def _query_tiles(query_start_loc, num_reqs: int, block_m: int, device):
    """(request index, first row) of every query tile, as int32 tensors on ``device``."""
    qsl = query_start_loc[: num_reqs + 1].to("cpu", torch.int64)
    lens = (qsl[1:] - qsl[:-1]).clamp_min(0)
    per = (lens + block_m - 1) // block_m
    req = torch.repeat_interleave(torch.arange(num_reqs), per)
    first = torch.cumsum(per, 0) - per
    row = (torch.arange(int(per.sum())) - torch.repeat_interleave(first, per)) * block_m
    return req.to(device, torch.int32), row.to(device, torch.int32)


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
    dtype = DTYPES[q.dtype]
    bm = block_m_for(dtype, d)
    out = torch.zeros_like(q)
    req, row = _query_tiles(query_start_loc, nreq, bm, q.device)
    if req.numel() == 0:
        return out
    bt = block_table[:nreq].to(torch.int32).contiguous()
    counter = checked_counter(q.device)
    counting = counter is not None
    if not counting:
        counter = torch.empty(1, dtype=torch.int32, device=q.device)
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    grid = (req.numel(), hq)
    paged_attn_kernel[grid](
        q, k_cache, v_cache, out, bt, seq_lens[:nreq].to(torch.int32).contiguous(),
        query_start_loc[: nreq + 1].to(torch.int32).contiguous(), slot_kinds, req, row, counter,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), bt.stride(0),
        hq // k_cache.shape[1], scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d_for(d), BLOCK_M=bm, BLOCK_N=bs, POLICY=POLICY_CODES[policy],
        VISUAL_SELF=bool(visual_self), COUNT_TILES=counting,
        DOT_F32=dtype == "fp32" or (dtype == "bf16" and interpreter_on()),
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        num_warps=4, num_stages=2,
    )
    return out


# ----------------------------------------------------------------------------- AOT specs
_PTR_NAMES = ("Q", "KC", "VC", "Out")


def _signature(dtype: str) -> dict:
    sig = {n: f"*{dtype}" for n in _PTR_NAMES}
    sig.update({"BlockTable": "*i32", "SeqLens": "*i32", "QStart": "*i32", "SlotKinds": "*i8", "TileReq": "*i32",
                "TileRow": "*i32", "Counter": "*i32"})
    for name in ("stride_qt", "stride_qh", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
                 "stride_vn", "stride_ot", "stride_oh", "stride_bt", "GROUP"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    for name in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "POLICY", "VISUAL_SELF", "COUNT_TILES", "DOT_F32",
                 "DOT_PRECISION"):
        sig[name] = "constexpr"
    return sig


@register_specs
def aot_specs() -> list[AotSpec]:
    """The launcher's one config (4 warps, 2 stages) per dtype x head dim x block size it serves.

    Shared memory is the K and V block tiles (block_size x BLOCK_D) plus the Q tile on sm90:
    fp16 at every tuned head dim for block sizes 16 (vLLM's CUDA default) and 64 (the largest);
    bf16 (same smem as fp16) and fp32 (FMA dots) at D=128; vskip with VISUAL_SELF, the largest code.
    """
    kernel = compilable(paged_attn_kernel)
    jobs = [("fp16", d, bs) for d in (64, 128, 256) for bs in (16, 64)]  # D=80, 96: BLOCK_D 128, as D=128
    jobs += [("bf16", 128, 32), ("fp32", 128, 16)]
    specs = []
    for dtype, d, bs in jobs:
        specs.append(aot_spec(
            name=f"paged_{dtype}_d{d}_bs{bs}",
            fn=kernel,
            signature=_signature(dtype),
            constexprs={"HEAD_DIM": d, "BLOCK_D": block_d_for(d), "BLOCK_M": block_m_for(dtype, d), "BLOCK_N": bs,
                        "POLICY": 1, "VISUAL_SELF": True, "COUNT_TILES": False, "DOT_F32": dtype == "fp32",
                        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
            num_warps=4, num_stages=2,
        ))
    return specs
