"""Launcher of the block-sparse prefill attention kernel (``attention_kernel.py``).

Also the public home of the debug tile counter (``count_tiles``, kept in
``triton_common`` with the other pieces the Triton launchers share) every Triton
kernel of the library reports to, and of the AOT specs the compile gate checks.

fp32 inputs are supported: scores and the PV product then use exact fp32 dots
(``input_precision="ieee"``, no TF32), so they match the fp32 reference.
"""
from __future__ import annotations

import torch
import triton

from ...kinds import POLICY_CODES
from ...schedule import Schedule
from ..dispatch import interpreter_on
from .attention_kernel import attn_fwd_kernel
from .common import (  # noqa: F401
    DTYPES,
    ELEM,
    LOG2E,
    TileCount,
    active_counter,
    aot_spec,
    block_d_for,
    check_supported,
    checked_counter,
    compilable,
    count_tiles,
)
from .spec import SMEM_LIMITS, TARGETS, AotSpec, register_specs

# Autotune varies only these (num_warps, num_stages); tile sizes come from the schedule.
# configs_for keeps those whose shared memory and registers fit the target. (8, 2) is the
# one config of tiles that fit only two stages (sm86/89 at D > 64, D=256 elsewhere) and
# need 8 warps to fit the registers.
TUNE_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4))
HEAD_DIMS = (64, 80, 96, 128, 256)

# Registers. Per thread, the KV loop keeps live (in 32-bit words, each tile spread over the
# 32 * num_warps threads): the fp32 accumulator (BLOCK_M x BLOCK_D), the fp32 scores S
# (BLOCK_M x BLOCK_N), the Q operand (BLOCK_M x BLOCK_D) and the K and V tiles on their way
# through registers (copy addresses, ldmatrix fragments; BLOCK_N x BLOCK_D each). ptxas has
# 255 registers per thread; pointers, the row statistics (m, l, visual mass), masks and loop
# state take the rest. Measured (ptxas -v, fp16/bf16, sm80-sm90, every stage count): 176
# words or fewer compile without spills (64x64 tiles at D=256 with 8 warps: 176; 128x64 at
# D=128 with 8 warps: 160), 192 or more spill (128x64 at D=64 with 4 warps: 192, 44-92 bytes
# on sm80; 64x64 at D=128 with 4 warps: 192, 8-16 bytes; 128x64 at D=128 with 4 warps: 320,
# 1000+ bytes). In practice: 4 warps only for 64x64 tiles at D=64; a 128-row tile or a head
# dim above 64 needs 8 warps. One rule for every target, so it is conservative on sm90,
# whose wgmma keeps Q in shared memory (128x64 at D=64 with 4 warps fits there). fp32's FMA
# dots are not this model's: their default tile is chosen for them (_default_blocks).
REG_BUDGET = 176


# ----------------------------------------------------------------------------- tile sizes / smem


def smem_estimate(cc: int, block_m: int, block_n: int, head_dim: int, dtype: str, num_stages: int) -> int:
    """Upper bound (bytes) of the kernel's shared memory, checked by the compile gate.

    K and V tiles are buffered ``num_stages`` deep by the software pipeliner; on sm90
    the Q tile also sits in shared memory as the wgmma A operand (earlier targets
    keep it in registers). fp32 (FMA dots) stages Q and P in shared memory on every
    target. 4 KiB covers reduction scratch, layout-conversion scratch and barriers
    (measured: D=256, 64x32 tiles, 3 stages allocates 4 KiB beyond its buffers).
    """
    e, bd = ELEM[dtype], block_d_for(head_dim)
    q = block_m * bd * e if cc >= 90 or dtype == "fp32" else 0
    p = block_m * block_n * e if dtype == "fp32" else 0  # FMA dots stage both operands in smem
    return num_stages * 2 * block_n * bd * e + q + p + 4096


def _capability(device: torch.device) -> int:
    if device.type != "cuda" or interpreter_on():
        return 90  # interpreter: no smem limit applies; pretend the largest target
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _smem_limit(cc: int) -> int:
    if cc in SMEM_LIMITS:
        return SMEM_LIMITS[cc]
    # Unknown arch: use the closest known one at or below it (never overestimate).
    known = [c for c in SMEM_LIMITS if c <= cc]
    return SMEM_LIMITS[max(known)] if known else min(SMEM_LIMITS.values())


def reg_estimate(block_m: int, block_n: int, head_dim: int, dtype: str, num_warps: int) -> int:
    """32-bit words per thread of the tiles the KV loop keeps live; at most REG_BUDGET fits."""
    e, bd = ELEM[dtype], block_d_for(head_dim)
    words = block_m * bd + block_m * block_n + (block_m * bd + 2 * block_n * bd) * e // 4
    return words // (32 * num_warps)


def _smem_fits(cc: int, dtype: str, head_dim: int, block_m: int, block_n: int) -> list[tuple[int, int]]:
    lim = _smem_limit(cc)
    return [(w, s) for w, s in TUNE_CONFIGS if smem_estimate(cc, block_m, block_n, head_dim, dtype, s) <= lim]


# fp32 is the correctness path (exact FMA dots, no tensor cores): one config, not tuned,
# so the gate compiles one kernel per tile instead of five that nobody tunes for speed.
FP32_CONFIG = (4, 2)


def configs_for(cc: int, dtype: str, head_dim: int, block_m: int, block_n: int) -> list[tuple[int, int]]:
    """(num_warps, num_stages) configs whose shared memory fits sm_<cc> and whose tiles fit
    the registers (``reg_estimate`` within REG_BUDGET: no spills); fp32: ``FP32_CONFIG``."""
    return [(w, s) for w, s in _smem_fits(cc, dtype, head_dim, block_m, block_n)
            if reg_estimate(block_m, block_n, head_dim, dtype, w) <= REG_BUDGET
            and (dtype != "fp32" or (w, s) == FP32_CONFIG)]


def _default_blocks(cc: int, dtype: str, head_dim: int) -> tuple[int, int]:
    big_smem = cc in (80, 90) or cc >= 100 or cc == 87
    if dtype == "fp32":
        # Correctness path (exact FMA dots, no tensor cores): the FMA lowering's registers
        # follow the tile and the pipeline depth erratically (32x32 at D=128 spilled 1450
        # bytes with 4 warps, 8-600 with 8 warps and 2 stages); 16x16 tiles compile without
        # spills with every config on every target and fit sm86/89's shared memory.
        return 16, 16
    if head_dim <= 128 and big_smem:
        return 128, 64
    if head_dim <= 128:
        return 64, 64
    return (64, 64) if big_smem else (64, 32)


def block_sizes(q: torch.Tensor) -> tuple[int, int]:
    """(block_m, block_n) to plan schedules with for inputs like ``q``."""
    check_supported("triton attention", q.dtype, q.shape[-1])
    if q.device.type != "cuda" or interpreter_on():
        return 64, 64
    return _default_blocks(_capability(q.device), DTYPES[q.dtype], q.shape[-1])


# ----------------------------------------------------------------------------- launch

_TUNE_KEY = ["TUNE_N", "GROUP", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "POLICY", "VISUAL_SELF", "WANT_MASS", "WANT_LSE"]


def _prune(configs, named_args, **kwargs):
    q = named_args["Q"]
    cc = _capability(q.device)
    fits = set(configs_for(cc, DTYPES[q.dtype], kwargs["HEAD_DIM"], kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
    return [c for c in configs if (c.num_warps, c.num_stages) in fits]


_tuned_kernel = None


def _autotuned():
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in TUNE_CONFIGS],
            key=_TUNE_KEY,
            prune_configs_by={"early_config_prune": _prune},
        )(attn_fwd_kernel)
    return _tuned_kernel


def _check_schedule(q, k, schedule: Schedule) -> None:
    bm, bn = schedule.block_m, schedule.block_n
    for name, blk in (("block_m", bm), ("block_n", bn)):
        if blk not in (16, 32, 64, 128):
            raise ValueError(f"schedule.{name} must be a power of two in 16..128 for the triton kernel, got {blk}")
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    mt, nt = triton.cdiv(nq, bm), triton.cdiv(nk, bn)
    expect = {"kind": (b, nk), "full_cnt": (b, mt), "part_cnt": (b, mt), "full_idx": (b, mt, nt), "part_idx": (b, mt, nt)}
    for name, shape in expect.items():
        t = getattr(schedule, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"schedule.{name} must be {list(shape)} for B={b}, Nq={nq}, Nk={nk}, "
                             f"block {bm}x{bn}; got {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"schedule.{name} is on {t.device} but q is on {q.device}")
        want = torch.int8 if name == "kind" else torch.int32
        if t.dtype != want:
            raise ValueError(f"schedule.{name} must be {want}, got {t.dtype}")


def prefill_forward(q, k, v, schedule: Schedule, softmax_scale: float, want_mass: bool, want_lse: bool):
    """(out [B,Hq,Nq,D] in q's dtype, mass fp32 [B,Hq,Nq] | None, lse fp32 [B,Hq,Nq] | None).

    One program per (query tile, head): for many queries. Few queries against a long cache
    go to the split-KV decode kernel instead (ops/attention.py routes)."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    check_supported("triton attention", q.dtype, d)
    _check_schedule(q, k, schedule)
    bm, bn = schedule.block_m, schedule.block_n
    dtype = DTYPES[q.dtype]
    cc = _capability(q.device)
    fitting = configs_for(cc, dtype, d, bm, bn)
    if not fitting:
        hint = f"plan the schedule with smaller block_m/block_n (block_sizes(q) gives {block_sizes(q)})"
        if not _smem_fits(cc, dtype, d, bm, bn):
            raise ValueError(f"block {bm}x{bn} with head dim {d} in {q.dtype} does not fit the shared memory of "
                             f"sm_{cc} ({_smem_limit(cc)} bytes); {hint}")
        w = max(w for w, _ in TUNE_CONFIGS)
        raise ValueError(f"block {bm}x{bn} with head dim {d} in {q.dtype} needs {reg_estimate(bm, bn, d, dtype, w)} "
                         f"registers per thread for its tiles even with {w} warps (at most {REG_BUDGET} compile "
                         f"without spills); {hint}")

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mass = torch.empty((bsz, hq, nq), dtype=torch.float32, device=q.device) if want_mass else None
    lse = torch.empty((bsz, hq, nq), dtype=torch.float32, device=q.device) if want_lse else None
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    counter = checked_counter(q.device)
    counting = counter is not None
    if not counting:
        counter = torch.empty(1, dtype=torch.int32, device=q.device)
    kind = schedule.kind if schedule.kind.stride(-1) == 1 else schedule.kind.contiguous()
    full_idx, part_idx = schedule.full_idx.contiguous(), schedule.part_idx.contiguous()
    full_cnt, part_cnt = schedule.full_cnt.contiguous(), schedule.part_cnt.contiguous()

    args = (
        q, k, v, out, mass if want_mass else dummy, lse if want_lse else dummy, kind,
        full_cnt, full_idx, part_cnt, part_idx, counter,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kind.stride(0), full_cnt.stride(0), full_idx.stride(0), full_idx.stride(1),
        hq, hq // hkv, nq, nk, float(softmax_scale) * LOG2E, triton.next_power_of_2(nq),
    )
    meta = dict(
        HEAD_DIM=d, BLOCK_D=block_d_for(d), BLOCK_M=bm, BLOCK_N=bn,
        POLICY=POLICY_CODES[schedule.policy], VISUAL_SELF=bool(schedule.visual_self),
        WANT_MASS=bool(want_mass), WANT_LSE=bool(want_lse), COUNT_TILES=counting,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        # Triton's interpreter multiplies bf16 operands as raw bits; bf16 x bf16 products
        # are exact in fp32, so dotting the upcast operands is the GPU's numerics.
        DOT_F32=dtype == "bf16" and interpreter_on(),
    )
    grid = (schedule.num_m_tiles, bsz * hq)
    if interpreter_on() or counting:
        # The interpreter ignores warps/stages; a counted run must not be benchmarked
        # (autotuning would add every trial launch to the counter).
        w, s = fitting[0]
        attn_fwd_kernel[grid](*args, **meta, num_warps=w, num_stages=s)
    else:
        _autotuned()[grid](*args, **meta)
    return out, mass, lse


# ----------------------------------------------------------------------------- AOT specs


_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od")


def _signature(dtype: str) -> dict:
    ptr = f"*{dtype}"
    sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "Mass": "*fp32", "Lse": "*fp32", "Kind": "*i8",
           "FullCnt": "*i32", "FullIdx": "*i32", "PartCnt": "*i32", "PartIdx": "*i32", "Counter": "*i32"}
    for t in "qkvo":
        for s in "bhmd" if t in "qo" else "bhnd":
            sig[f"stride_{t}{s}"] = "i32"
    for name in ("stride_kind_b", "stride_cnt_b", "stride_idx_b", "stride_idx_m", "Hq", "GROUP", "Nq", "Nk"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    sig["TUNE_N"] = "i32"
    for name in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "POLICY", "VISUAL_SELF", "WANT_MASS", "WANT_LSE",
                 "COUNT_TILES", "DOT_PRECISION", "DOT_F32") + _UNIT_STRIDES:
        sig[name] = "constexpr"
    return sig


@register_specs
def aot_specs() -> list[AotSpec]:
    """Every (autotune config x default tile x head dim x dtype) the launcher can pick, with
    exactly the targets that pick it (``configs_for`` on the target's default tile), so the
    compile gate sees everything that can run.

    D=80 and D=96 share BLOCK_D=128 (and shared memory) with D=128 but compile their own
    masked head-dim loads, so each head dim is its own spec. WANT_MASS=True with
    POLICY=vskip and VISUAL_SELF is the largest code (mass adds registers, not shared
    memory); the other variants only drop terms.
    """
    kernel = compilable(attn_fwd_kernel)
    specs = []
    for d in HEAD_DIMS:
        for dtype in ("fp16", "bf16", "fp32"):
            launched: dict[tuple[int, int, int, int], list[int]] = {}  # (bm, bn, w, s) -> targets
            for cc in TARGETS:
                bm, bn = _default_blocks(cc, dtype, d)
                for w, s in configs_for(cc, dtype, d, bm, bn):
                    launched.setdefault((bm, bn, w, s), []).append(cc)
            for (bm, bn, w, s), targets in launched.items():
                specs.append(aot_spec(
                    name=f"attn_{dtype}_d{d}_m{bm}n{bn}_w{w}s{s}",
                    fn=kernel,
                    signature=_signature(dtype),
                    constexprs={"HEAD_DIM": d, "BLOCK_D": block_d_for(d), "BLOCK_M": bm, "BLOCK_N": bn,
                                "POLICY": 1, "VISUAL_SELF": True, "WANT_MASS": True, "WANT_LSE": True,
                                "COUNT_TILES": False, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                                "DOT_F32": False, **{n: 1 for n in _UNIT_STRIDES}},
                    num_warps=w, num_stages=s, targets=tuple(targets),
                ))
    return specs
