"""Model level, with FlashVLM's throughput metrics, on random-weight 7B VLM decoders.

Per model and method: prefill time/sample (= TTFT: the input plus the first output
token), decode time/token (after the first token), decode time/sample, average
output length, overall throughput (all output tokens / total time). The number of
generated tokens is fixed (min_new_tokens = max_new_tokens), so every method
generates the same amount of work.

Plans are built by hand from the deepest layers. Timing does not depend on which
layers are chosen: every decoder layer of these models has the same shapes and
cost, so N skipped layers save the same time wherever they sit.
"""

from __future__ import annotations

import gc

import torch

from vskip_kernels import PruneStage, SkipPlan
from vskip_kernels.cost import DecoderDims, prefill_cost
from vskip_kernels.hf.compat import cache_kwargs  # generate()'s cache keyword (renamed in 5.24)

from .common import check, checkpoint, fill_speedups, find, free_memory, result_entry, summarize, wall_ms
from .model_configs import MODEL_CASES, SMOKE_MODEL_CASES, build_model, input_ids_for, text_config, visual_token_id

DENSE = "dense (sdpa)"
VSKIP_N, SHORTV_N, FLASHVLM_R = 19, 19, 0.2
FASTV_K, FASTV_KEEP = 2, 0.5  # FastV's K=2 R=50%, the setting ShortV (Table 5) and V-Skip (Table 2) combine with


# --methods keys, in method_plans' order; the dense SDPA baseline always runs first
METHOD_KEYS = (
    "dense-sdpa",
    "dense-ours",
    "vskip",
    "shortv",
    "flashvlm",
    "vskip+flashvlm",
    "shortv+flashvlm",
    "shortv+vskip",
    "fastv",
    "fastv+shortv",
    "fastv+vskip",
)


def method_plans(num_layers: int, smoke: bool, methods=None):
    """(name, plan or None, description) per method; N scales down for the tiny smoke model.

    ``methods``: keys of METHOD_KEYS to run, in that order (the dense SDPA baseline, which
    every speedup is relative to, is always first); None runs them all."""
    plans = dict(zip(METHOD_KEYS, _all_plans(num_layers, smoke)))
    if methods is None:
        return list(plans.values())
    unknown = sorted(set(methods) - set(METHOD_KEYS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_KEYS)}")
    keys = ["dense-sdpa"] + [m for m in dict.fromkeys(methods) if m != "dense-sdpa"]
    return [plans[m] for m in keys]


def _all_plans(num_layers: int, smoke: bool):
    n = VSKIP_N if not smoke else num_layers // 2
    n = min(n, num_layers - 1)
    k = max(1, round(FLASHVLM_R * num_layers))
    deepest = lambda c: list(range(num_layers - c, num_layers))
    mk = lambda **kw: SkipPlan(num_layers=num_layers, method="manual (deepest layers, timing only)", **kw)
    fastv = [PruneStage(min(FASTV_K, num_layers - 1), FASTV_KEEP)]
    return [
        (DENSE, None, {"kind": "dense"}),
        ("dense (vskip_kernels attention, empty plan)", mk(), {"kind": "dense"}),
        (f"vskip N={n}", mk(vskip_layers=deepest(n)), {"kind": "vskip", "n": n}),
        (f"shortv N={n}", mk(frozen_layers=deepest(n)), {"kind": "shortv", "n": n}),
        (f"flashvlm r={FLASHVLM_R}", mk(decode_bypass_layers=deepest(k)), {"kind": "flashvlm", "bypass": k}),
        (
            f"vskip N={n} + flashvlm r={FLASHVLM_R}",
            mk(vskip_layers=deepest(n), decode_bypass_layers=deepest(k)),
            {"kind": "vskip+flashvlm", "n": n, "bypass": k},
        ),
        (
            f"shortv N={n} + flashvlm r={FLASHVLM_R}",
            mk(frozen_layers=deepest(n), decode_bypass_layers=deepest(k)),
            {"kind": "shortv+flashvlm", "n": n, "bypass": k},
        ),
        (
            f"shortv N={n} + vskip in the other {num_layers - n} layers",
            mk(frozen_layers=deepest(n), vskip_layers=list(range(num_layers - n))),
            {"kind": "shortv+vskip", "n": n, "vskip_n": num_layers - n},
        ),
        (f"fastv K={fastv[0].layer} keep={FASTV_KEEP}", mk(prune=fastv), {"kind": "fastv", "k": fastv[0].layer}),
        (
            f"fastv K={fastv[0].layer} keep={FASTV_KEEP} + shortv N={n}",
            mk(prune=fastv, frozen_layers=deepest(n)),
            {"kind": "fastv+shortv", "k": fastv[0].layer, "n": n},
        ),
        (
            f"fastv K={fastv[0].layer} keep={FASTV_KEEP} + vskip N={n}",
            mk(prune=fastv, vskip_layers=deepest(n)),
            {"kind": "fastv+vskip", "k": fastv[0].layer, "n": n},
        ),
    ]


def _generate(model, ids, new_tokens: int, cache=None):
    """Greedy generation of exactly ``new_tokens`` tokens. With ``cache`` (a StaticCache reused
    by every call, so the captured graphs keep their buffers) decode steps run compiled."""
    from transformers import CompileConfig

    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if cache is not None:
        kw.update(cache_kwargs(cache), compile_config=CompileConfig(mode="reduce-overhead", fullgraph=False))
    with torch.inference_mode():
        if cache is not None:
            cache.reset()
        return model.generate(**kw)


def time_method(model, ids, args, device, graphs: bool):
    """Returns (result fields, decode mode actually used, fallback reason or None)."""
    fallback = None
    t = args.max_new_tokens
    cache, compiled, graph_info = None, False, {}
    if graphs:
        try:
            from torch._dynamo.utils import counters
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=int(ids.shape[1]) + t)
            counters.clear()
            _generate(model, ids, t, cache)  # compiles and captures the decode graphs
            compiled = counters["stats"]["unique_graphs"] > 0
            # a decode step that breaks into several graphs (host syncs, data-dependent branches)
            # loses much of what CUDA graphs save: recorded with the timing
            graph_info = {
                "decode_graph_count": int(counters["stats"]["unique_graphs"]),
                "decode_graph_breaks": int(sum(counters["graph_break"].values())),
            }
        except Exception as exc:
            fallback = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            graphs, cache = False, None
            torch._dynamo.reset()
            free_memory(device)
    if not graphs:
        _generate(model, ids, t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft, total, lengths = [], [], []
    for _ in range(args.model_repeats):
        ms, _ = wall_ms(lambda: _generate(model, ids, 1, cache), device)
        ttft.append(ms)
        ms, out = wall_ms(lambda: _generate(model, ids, t, cache), device)
        total.append(ms)
        lengths.append(int(out.shape[1] - ids.shape[1]))
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    tt, tot = summarize(ttft), summarize(total)
    avg_len = sum(lengths) / len(lengths)
    decode_sample = tot.ms_median - tt.ms_median  # unclamped: noise shows as noise, not as a zero
    fields = dict(
        timing=tt,
        peak=peak,
        prefill_ms=tt.ms_median,
        ttft_ms=tt.ms_median,
        total_ms=tot.ms_median,
        total_ms_p20=tot.ms_p20,
        total_ms_p80=tot.ms_p80,
        decode_ms_per_sample=decode_sample,
        decode_ms_per_token=decode_sample / (avg_len - 1) if avg_len > 1 else None,
        avg_output_len=avg_len,
        throughput_tok_s=avg_len / (tot.ms_median * 1e-3) if tot.ms_median > 0 else None,
        **graph_info,
    )
    if not graphs:
        mode = "eager (dynamic cache)"
    elif compiled:
        mode = "static cache + torch.compile(mode='reduce-overhead') (CUDA graphs)"
    else:
        mode = "static cache, eager (transformers' compile criteria not met)"
    return fields, mode, fallback


def finish_case(case, results, skipped, dtype, num_layers, input_len, new_tokens):
    """(shape, case) documents from the methods measured so far: speedups among them and
    each method against the dense baseline, all from the measured times."""
    fill_speedups(results)
    base = find(results, DENSE)
    for r in results:
        if base is None or r is base:
            continue
        r["vs_dense"] = {
            "ttft_speedup": base["ttft_ms"] / r["ttft_ms"],
            "decode_token_reduction_pct": (1 - r["decode_ms_per_token"] / base["decode_ms_per_token"]) * 100
            if r["decode_ms_per_token"] and base["decode_ms_per_token"]
            else None,
            "throughput_gain_pct": (r["throughput_tok_s"] / base["throughput_tok_s"] - 1) * 100
            if r["throughput_tok_s"] and base["throughput_tok_s"]
            else None,
        }
    shape = {
        "name": case.name,
        "family": case.family,
        "num_layers": num_layers,
        "num_visual": case.num_visual,
        "visual_token": case.visual_token,
        "input_len": input_len,
        "new_tokens": new_tokens,
        "batch": 1,
    }
    return shape, {
        "case": case.name,
        "model": case.name,
        "dtype": str(dtype).replace("torch.", ""),
        "input_len": input_len,
        "results": results,
        "skipped": skipped,
    }


def run_model(case, args, device, dtype, progress=None):
    """Every method on one model; ``progress(shape, case)`` (optional) after each method."""
    results, skipped = [], []
    model = None
    try:
        model = build_model(case, device, dtype)
        ids = input_ids_for(model, case, device)
        num_layers = text_config(model).num_hidden_layers
        want_graphs = args.decode_mode == "graphs" and device.type == "cuda"
        plans = method_plans(num_layers, args.smoke, getattr(args, "methods", None))
        # counted cost of each plan on this prompt, beside the times (the same on every machine)
        dims = DecoderDims.from_config(text_config(model))
        layout = ids[0].cpu() == visual_token_id(model, case)
        dense_cost = prefill_cost(None, layout, dims, kv_bytes_per_elem=dtype.itemsize)
        for name, plan, desc in plans:
            handle = None
            try:
                if plan is not None:
                    from vskip_kernels.hf import apply_skip_plan

                    handle = apply_skip_plan(model, plan)
                fields, mode, fallback = time_method(model, ids, args, device, want_graphs)
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                skipped.append({"backend": name, "reason": f"{type(exc).__name__}: {msg}"})
                continue
            finally:
                if handle is not None:
                    handle.remove()
                if want_graphs:
                    torch._dynamo.reset()  # the next method patches the model: compile it afresh
                free_memory(device)
            timing, peak = fields.pop("timing"), fields.pop("peak")
            cost = prefill_cost(plan, layout, dims, kv_bytes_per_elem=dtype.itemsize)
            entry = result_entry(
                name,
                timing,
                peak_mem_bytes=peak,
                metric="ttft",
                method=desc,
                plan=None
                if plan is None
                else {
                    "vskip": plan.vskip_layers,
                    "frozen": plan.frozen_layers,
                    "decode_bypass": plan.decode_bypass_layers,
                    "prune": [vars(st) for st in plan.prune],
                },
                decode_mode=mode,
                decoder_prefill_flops=cost.flops,
                decoder_flops_pct_of_dense=100 * cost.flops / dense_cost.flops,
                kv_cache_bytes=cost.kv_bytes,
                **fields,
            )
            if want_graphs and fallback is not None:
                entry["decode_graphs_error"] = fallback
            if not want_graphs and args.decode_mode == "graphs":
                entry["decode_graphs_error"] = "CUDA graphs need a CUDA device"
            results.append(entry)
            if progress is not None:
                progress(
                    *finish_case(case, results, skipped, dtype, num_layers, int(ids.shape[1]), args.max_new_tokens)
                )
    finally:
        del model
        gc.collect()
        free_memory(device)
    return finish_case(case, results, skipped, dtype, num_layers, int(ids.shape[1]), args.max_new_tokens)


FLASHVLM_TARGET_MODEL = "llava-1.5-7b"


def model_checks(case_name: str, c: dict) -> list[dict]:
    out = []
    for r in c["results"]:
        vd, kind = r.get("vs_dense"), r["method"]["kind"]
        if vd is None:
            continue
        if kind == "shortv" and case_name == "llava-next-7b":
            out.append(
                check(
                    "ShortV TTFT speedup on LLaVA-NeXT-7B",
                    vd["ttft_speedup"],
                    ">= 1.6",
                    vd["ttft_speedup"] >= 1.6,
                    model=case_name,
                    method=r["backend"],
                )
            )
        if kind == "shortv+vskip" and case_name == "qwen2.5-vl-7b-video32k":
            out.append(
                check(
                    "ShortV + V-Skip (all layers) TTFT speedup on Qwen2.5-VL-7B (32k visual)",
                    vd["ttft_speedup"],
                    ">= 3",
                    vd["ttft_speedup"] >= 3.0,
                    model=case_name,
                    method=r["backend"],
                )
            )
        if kind == "vskip" and case_name == "qwen2.5-vl-7b-video32k":
            out.append(
                check(
                    "V-Skip TTFT speedup on Qwen2.5-VL-7B (32k visual)",
                    vd["ttft_speedup"],
                    ">= 1.3",
                    vd["ttft_speedup"] >= 1.3,
                    model=case_name,
                    method=r["backend"],
                )
            )
        if kind == "flashvlm" and vd["decode_token_reduction_pct"] is not None:
            # the target is stated for LLaVA-1.5-7B; other models are reported against the same bar
            out.append(
                check(
                    "FlashVLM r=0.2 decode time/token reduction (%)",
                    vd["decode_token_reduction_pct"],
                    ">= 17",
                    vd["decode_token_reduction_pct"] >= 17.0,
                    model=case_name,
                    method=r["backend"],
                    target_applies=case_name == FLASHVLM_TARGET_MODEL,
                )
            )
    return out


def run(args, device, dtype):
    model_cases = SMOKE_MODEL_CASES if args.smoke else MODEL_CASES
    if args.models:
        unknown = sorted(set(args.models) - {m.name for m in model_cases})
        if unknown:
            raise SystemExit(f"unknown --models {unknown}; choose from {[m.name for m in model_cases]}")
        by_name = {m.name: m for m in model_cases}
        model_cases = [by_name[n] for n in dict.fromkeys(args.models)]  # in the order asked for
    shapes, out, checks = [], [], []

    def progress(shape, c):
        checkpoint(args, shapes + [shape], out + [c], checks + model_checks(c["case"], c))

    for case in model_cases:
        try:
            shape, c = run_model(case, args, device, dtype, progress)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            shapes.append({"name": case.name, "family": case.family, "num_visual": case.num_visual})
            out.append(
                {
                    "case": case.name,
                    "model": case.name,
                    "results": [],
                    "skipped": [{"backend": "(all methods)", "reason": f"{type(exc).__name__}: {msg}"}],
                }
            )
            free_memory(device)
            checkpoint(args, shapes, out, checks)
            continue
        shapes.append(shape)
        out.append(c)
        checks.extend(model_checks(case.name, c))
        checkpoint(args, shapes, out, checks)
    notes = [
        "random weights, real decoder configs; input_ids with visual placeholder tokens and no pixels, so the "
        "vision encoder (identical for every method) is not timed",
        "prefill_ms = TTFT = generate(max_new_tokens=1); decode = generate(T) - TTFT, per token over T - 1 tokens",
        "throughput = output tokens (incl. the first) / total time; batch 1",
        "plans take the deepest layers; all decoder layers cost the same, so timing does not depend on the choice",
        "ms_median/ms_p20/ms_p80 of each result are TTFT; speedup_vs compares TTFT",
    ]
    return shapes, out, checks, notes
