"""Decode attention: one new query token against a KV cache of 4k..32k positions.

Our kernels take their split-KV path here (one query row cannot fill the GPU
otherwise). Decode is bound by reading K and V, so besides time each result
reports the effective bandwidth ``gbps`` = bytes of K and V read / time.
"""

from __future__ import annotations

import vskip_kernels as vk

from . import baselines, cases
from .attention import OURS_TORCH, OURS_TRITON, block_sizes, triton_usable
from .common import checkpoint, fill_speedups, find, measure


def run_case(label, hq, hkv, d, n, args, device, dtype):
    shape = cases.AttnShape(
        f"decode-{label}-n{n}",
        label,
        hq,
        hkv,
        d,
        cases.one_image(n - cases.SYS - cases.PROMPT) if n > cases.SYS + cases.PROMPT + 1 else (("text", n),),
    )
    is_visual = cases.is_visual_for(shape.segments, device)
    q, k, v = cases.qkv(shape, device, dtype, nq=1)
    use_triton, no_triton = triton_usable(device)
    kv_bytes = 2 * k.numel() * k.element_size()
    results, skipped = [], []
    ctx = dict(skipped=skipped, results=results)
    if use_triton:
        bm, bn = block_sizes(q, True, args.smoke)
        sched = vk.plan_schedule(is_visual, nq=1, policy="dense", block_m=bm, block_n=bn)
        measure(
            OURS_TRITON,
            lambda: lambda: vk.modality_attention(q, k, v, is_visual, policy="dense", schedule=sched, backend="triton"),
            device,
            args,
            **ctx,
        )
    else:
        skipped.append({"backend": OURS_TRITON, "reason": no_triton})
    measure(
        OURS_TORCH,
        lambda: lambda: vk.modality_attention(q, k, v, is_visual, policy="dense", backend="torch"),
        device,
        args,
        **ctx,
    )
    measure("sdpa", lambda: baselines.sdpa(q, k, v), device, args, **ctx)
    mods, reason = baselines.flash_attn_module()
    if mods is None:
        skipped.append({"backend": "flash-attn-2 (flash_attn_with_kvcache)", "reason": reason})
    else:
        measure(
            "flash-attn-2 (flash_attn_with_kvcache)", lambda: baselines.flash_attn_decode(q, k, v), device, args, **ctx
        )
    measure("eager", lambda: baselines.eager(q, k, v, baselines.bool_mask(is_visual, 1, "dense")), device, args, **ctx)
    for r in results:
        r["gbps"] = kv_bytes / (r["ms_median"] * 1e-3) / 1e9 if r["ms_median"] > 0 else None
    fill_speedups(results)
    return shape, {
        "case": shape.name,
        "heads": label,
        "cache_len": n,
        "kv_bytes": kv_bytes,
        "dtype": str(dtype).replace("torch.", ""),
        "results": results,
        "skipped": skipped,
    }


def run(args, device, dtype):
    lens = cases.SMOKE_DECODE_CACHE_LENS if args.smoke else cases.DECODE_CACHE_LENS
    heads = cases.SMOKE_DECODE_HEADS if args.smoke else cases.DECODE_HEADS
    shapes, out = [], []
    for label, hq, hkv, d in heads:
        for n in lens:
            shape, case = run_case(label, hq, hkv, d, n, args, device, dtype)
            shapes.append(shape.describe())
            out.append(case)
            checkpoint(args, shapes, out, [])
    checks = []
    notes = [
        "query = the newest (text) token; it attends to every cached position, so policy is dense",
        "gbps counts K and V bytes read once; speedup_vs compares backends of the same case",
    ]
    for c in out:
        ours = find(c["results"], OURS_TRITON)
        if ours is not None and find(c["results"], "flash-attn-2 (flash_attn_with_kvcache)") is not None:
            c["vs_flash_attn"] = ours["speedup_vs"]["flash-attn-2 (flash_attn_with_kvcache)"]
    return shapes, out, checks, notes
