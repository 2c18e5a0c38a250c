"""``vskip demo``: every method on a tiny VLM trained here, scored by what it costs in accuracy.

The shipped tiny LLaVA (``vskip_kernels.tinyvlm``) answers questions about synthetic
scenes of coloured shapes; its answers need the image. For each skipping mode the
demo calibrates the paper's metric (V-Skip VIG -> vskip, ShortV LC -> frozen,
FlashVLM visual mass -> decode bypass) and the papers' baselines (ShortGPT cosine,
depth, random) with the same target, on the calibration split; applies each plan
for N layers, N swept. Then token pruning, as the papers run it: FastV (K in {2, 4},
keep in {0.5, 0.25}), VTW (every visual token withdrawn at the middle layer), and FastV
(K=2, keep 0.5) followed by ShortV/LC and V-Skip/VIG layers calibrated on the pruned model.
It reports, against the dense model on the evaluation split: accuracy, token agreement,
counted decoder prefill FLOPs (% of dense) and KV-cache bytes, prefill and decode time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

# mode -> the metric its paper defines for it; the baselines are scored in every mode
MODES = {"vskip": "vig", "frozen": "lc", "decode_bypass": "visual_mass"}
BASELINES = ("cosine", "depth", "random")
SCORED = ("vig", "lc", "visual_mass", "cosine")  # per-layer scores worth printing and plotting
FASTV = tuple((k, keep) for k in (2, 4) for keep in (0.5, 0.25))  # (K, keep) rows, FastV's grid
COMBINED_BASE = (2, 0.5)  # the FastV stage the combinations calibrate on, as ShortV Table 5 and V-Skip Table 2
COMBINED = (("frozen", "lc"), ("vskip", "vig"))  # mode and metric calibrated on top of FastV


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_step_times(model, inputs, tokens: int) -> tuple[float, list[float]]:
    """(prefill ms, [ms of each decode step]) of one greedy ``generate()`` of exactly ``tokens``
    tokens. Each step is stamped where generate() hands its new token to the stopping criteria,
    so decode steps are measured directly, not as the difference of two separate runs."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    dev = inputs["input_ids"].device
    stamps: list[float] = []

    class _Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            _sync(dev)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    _sync(dev)
    t0 = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([_Clock()]),
    )
    ms = [(b - a) * 1e3 for a, b in zip([t0] + stamps, stamps)]
    return ms[0], ms[1:]


def time_plans(model, handle, plans, inputs, tokens: int, repeats: int) -> list[tuple[float, float]]:
    """(median prefill ms, median decode ms per token) of each plan on ``inputs``.

    One warm-up run of every plan first (the first plan must not pay for cold caches and
    lazy initialisation), then ``repeats`` rounds that run the plans interleaved, so a burst
    of load from another process spreads over all plans instead of landing on one."""
    import statistics

    for plan in plans:
        handle.set_plan(plan)
        _generate_step_times(model, inputs, tokens)
    prefill: list[list[float]] = [[] for _ in plans]
    decode: list[list[float]] = [[] for _ in plans]
    for _ in range(repeats):
        for i, plan in enumerate(plans):
            handle.set_plan(plan)
            p, steps = _generate_step_times(model, inputs, tokens)
            prefill[i].append(p)
            decode[i].extend(steps)
    return [(statistics.median(p), statistics.median(d)) for p, d in zip(prefill, decode)]


def _threads_note(dev) -> str:
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n > 1 else ''})" if dev.type == "cpu" else ""


def demo_threads() -> int:
    """CPU threads for the demo: OMP_NUM_THREADS when the user set it, else one fewer than
    the cores this process may use (at least one). torch's default uses every core, and its
    OpenMP loops wait for their slowest thread: with one core busy elsewhere the demo then
    ran 8x slower on a 2-core machine (90 s vs 11 s quiet), against 1.0x with one thread."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _check_budgets(budgets, num_layers: int) -> list[int]:
    budgets = sorted(set(budgets))
    if not budgets:
        raise ValueError("budgets must name at least one number of layers to skip")
    for n in budgets:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < num_layers:
            # all layers bypassed on decode is rejected by the HF integration, and 0 is the dense row
            raise ValueError(
                f"budgets must be ints in [1, {num_layers - 1}] for this {num_layers}-layer model, got {n!r}"
            )
    return budgets


def _evaluate(model, processor, data, batch_size: int, tokens: int):
    """(accuracy, generated ids) of greedy answers on ``data``."""
    from .tinyvlm.evaluate import generate_answers

    right, gens = 0, []
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        answers, gen = generate_answers(model, processor, chunk, max_new_tokens=tokens)
        right += sum(a == s.answer for a, s in zip(answers, chunk))
        gens.append(gen)
    return right / len(data), torch.cat(gens)


def _agreement(gen: torch.Tensor, dense: torch.Tensor, eos: int) -> float:
    """Share of the dense model's answer tokens (up to and including EOS) that the plan reproduces."""
    upto = (dense == eos).int().cumsum(1)
    counted = (upto == 0) | ((upto == 1) & (dense == eos))
    return float(((gen == dense) & counted).sum() / counted.sum())


def run_demo(
    *,
    quick: bool = False,
    calibration_samples: int | None = None,
    eval_samples: int | None = None,
    budgets=None,
    device: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    model_path: str | None = None,
    threads: int | None = None,
    out=print,
) -> dict:
    """Calibrate every method, apply each plan for every budget, evaluate; print and return the results.

    On a CPU the demo runs with ``threads`` torch threads (default ``demo_threads()``) and
    restores torch's setting afterwards."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads or demo_threads())
    try:
        return _run_demo(quick, calibration_samples, eval_samples, budgets, dev, seed, progress, model_path, out)
    finally:
        torch.set_num_threads(before)


def _run_demo(quick, calibration_samples, eval_samples, budgets, dev, seed, progress, model_path, out) -> dict:
    from .calibrate import calibrate
    from .calibrate._common import TARGET_FIELDS, lowest
    from .cost import DecoderDims, prefill_cost
    from .hf import apply_skip_plan, num_decoder_layers
    from .plan import SkipPlan
    from .tinyvlm.data import encode_prompts
    from .tinyvlm.evaluate import prepare_inputs
    from .tinyvlm.model import EOS, load_pretrained
    from .tinyvlm.task import chance_accuracy, samples

    # Defaults sized for a CPU: 61 plans x the evaluation split is most of the demo's time;
    # 200 samples put one binomial sigma of a ~99% accuracy below one point.
    n_cal = calibration_samples if calibration_samples is not None else (16 if quick else 32)
    n_eval = eval_samples if eval_samples is not None else (48 if quick else 200)
    for name, v in (("calibration_samples", n_cal), ("eval_samples", n_eval)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if progress is None:  # bars only on a terminal: in logs and CI they are noise
        progress = sys.stderr.isatty()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, processor = load_pretrained(model_path, device=dev, dtype=dtype)
    num = num_decoder_layers(model)
    budgets = _check_budgets(budgets if budgets is not None else ([num // 3] if quick else list(range(2, num, 2))), num)
    tokens = 9  # the longest answer ("triangle") plus EOS
    batch_size = 64
    repeats = 3  # interleaved rounds per plan after a warm-up round; medians over them

    cal_samples = samples("calibration", 0, n_cal)
    cal = [prepare_inputs(encode_prompts(processor, cal_samples[i : i + 16]), model) for i in range(0, n_cal, 16)]
    ev = samples("eval", 0, n_eval)
    timing = prepare_inputs(encode_prompts(processor, ev[:8]), model)  # a fixed batch of 8 for the clock
    n_vis = int((timing["input_ids"][0] == model.config.image_token_id).sum())
    out(
        f"model: tiny LLaVA trained on synthetic scenes, {num} decoder layers, {n_vis} visual tokens per image, "
        f"{dtype} on {dev}{_threads_note(dev)}; calibration on {n_cal} samples, evaluation on {n_eval} "
        f"(chance {chance_accuracy(s.qtype for s in ev) * 100:.1f}%), N = {budgets}"
    )

    # Scores do not depend on the budget for these methods (each plan takes the N lowest),
    # so one calibration per (mode, method) serves every N, exactly as calibrate(budget=N) would.
    scores: dict[tuple[str, str], list[float]] = {}
    for mode, metric in MODES.items():
        for method in (metric,) + BASELINES:
            plan = calibrate(
                model, cal, method, budget=budgets[-1], seed=seed, max_new_tokens=tokens, progress=progress, target=mode
            )
            assert plan.scores is not None  # calibrate always scores every layer
            scores[(mode, method)] = plan.scores

    plans = [("dense", "-", 0, SkipPlan(num_layers=num))]
    for (mode, method), sc in scores.items():
        for n in budgets:
            layers: dict[str, Any] = {TARGET_FIELDS[mode]: lowest(sc, n)}
            plans.append((mode, method, n, SkipPlan(num_layers=num, method=method, budget=n, scores=sc, **layers)))
    plans += _pruning_plans(model, cal, num, budgets, seed, tokens, progress)
    # Counted on the first timing prompt: what the plan costs on any machine.
    dims = DecoderDims.from_config(model.config.get_text_config())
    layout = timing["input_ids"][0][timing["attention_mask"][0].bool()] == model.config.image_token_id
    dense_cost = prefill_cost(None, layout, dims, kv_bytes_per_elem=dtype.itemsize)
    rows = []
    bar = _bar(len(plans), progress, "evaluating plans")
    handle = apply_skip_plan(model, plans[0][3])
    try:
        with torch.no_grad():
            dense = None
            for mode, method, n, plan in plans:
                handle.set_plan(plan)
                acc, gen = _evaluate(model, processor, ev, batch_size, tokens)
                if dense is None:
                    dense = gen
                cost = prefill_cost(plan, layout, dims, kv_bytes_per_elem=dtype.itemsize)
                rows.append(
                    {
                        "mode": mode,
                        "method": method,
                        "n": n,
                        "layers": _layers_text(plan, mode),
                        "prune": [vars(s) for s in plan.prune],
                        "accuracy": acc,
                        "agreement": _agreement(gen, dense, EOS),
                        "flops_pct": 100 * cost.flops / dense_cost.flops,
                        "kv_bytes": cost.kv_bytes,
                    }
                )
                if bar is not None:
                    bar.update()
            times = time_plans(model, handle, [p[3] for p in plans], timing, tokens, repeats)
            for row, (prefill, decode) in zip(rows, times):
                row["prefill_ms"], row["decode_ms_per_token"] = prefill, decode
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
    print_table(rows, out)
    print_scores(scores, num, out)
    return {
        "rows": rows,
        "scores": {f"{m}/{k}": v for (m, k), v in scores.items()},
        "budgets": budgets,
        "num_layers": num,
    }


def _pruning_plans(model, cal, num: int, budgets, seed: int, tokens: int, progress) -> list:
    """(mode, method, N, plan) rows of token pruning: FastV's grid, VTW, and FastV followed by
    layers calibrated on the pruned model (``calibrate(..., base_plan=fastv)``)."""
    from .calibrate import calibrate
    from .calibrate._common import TARGET_FIELDS, lowest
    from .plan import PruneStage, SkipPlan

    out = []
    for k, keep in FASTV:
        out.append(("fastv", "last", 0, SkipPlan(num_layers=num, method="fastv", prune=[PruneStage(k, keep)])))
    out.append(("vtw", "-", 0, SkipPlan(num_layers=num, method="vtw", prune=[PruneStage(num // 2, 0.0)])))
    base = SkipPlan(num_layers=num, method="fastv", prune=[PruneStage(*COMBINED_BASE)])
    for mode, metric in COMBINED:
        plan = calibrate(
            model,
            cal,
            metric,
            budget=budgets[-1],
            seed=seed,
            max_new_tokens=tokens,
            progress=progress,
            target=mode,
            base_plan=base,
        )
        assert plan.scores is not None
        for n in budgets:
            layers: dict[str, Any] = {TARGET_FIELDS[mode]: lowest(plan.scores, n)}
            pruned = SkipPlan(num_layers=num, method=metric, budget=n, scores=plan.scores, prune=base.prune, **layers)
            out.append((f"fastv+{mode}", metric, n, pruned))
    return out


def _layers_text(plan, mode: str) -> str:
    from .calibrate._common import TARGET_FIELDS

    parts = [f"K={s.layer} keep={s.keep:g}" for s in plan.prune]
    field = TARGET_FIELDS.get(mode.split("+")[-1])  # "fastv+frozen" -> frozen_layers; dense, fastv, vtw: none
    layers = getattr(plan, field) if field else []
    if layers or not parts:
        parts.append(str(layers))
    return " ".join(parts)


def print_table(rows: list[dict], out=print) -> None:
    dense = rows[0]["accuracy"]
    w = max(34, *(len(r["layers"]) for r in rows))
    out(
        f"{'mode':<14} {'method':<12} {'N':>2} {'layers':<{w}} {'accuracy':>8} {'vs dense':>8} {'agree':>6} "
        f"{'FLOPs':>6} {'KV KiB':>7} {'prefill ms':>10} {'decode ms/tok':>13}"
    )
    for r in rows:
        out(
            f"{r['mode']:<14} {r['method']:<12} {r['n']:>2} {r['layers']:<{w}} {r['accuracy'] * 100:>7.1f}% "
            f"{(r['accuracy'] - dense) * 100:>+7.1f} {r['agreement'] * 100:>5.1f}% {r['flops_pct']:>5.1f}% "
            f"{r['kv_bytes'] / 1024:>7.1f} {r['prefill_ms']:>10.1f} {r['decode_ms_per_token']:>13.2f}"
        )


def print_scores(scores: dict, num: int, out=print) -> None:
    """Per-layer scores of the data-driven metrics (lower = skipped first)."""
    cols = [(m, k) for (m, k) in scores if k in SCORED]
    out("per-layer scores (lower = skipped first):")
    out(f"{'layer':>5} " + " ".join(f"{k + ('/' + m if k == 'cosine' else ''):>22}" for m, k in cols))
    for i in range(num):
        out(f"{i:>5} " + " ".join(f"{scores[c][i]:>22.4g}" for c in cols))
