"""``calibrate``: score every decoder layer with one method and turn the scores into a SkipPlan."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..plan import SkipPlan
from ._common import (
    TARGET_FIELDS,
    TARGETS,
    check_base_plan,
    check_choice,
    lowest,
    model_info,
    plan_summary,
    pop_options,
    resolve_budget,
    taken_layers,
    with_layers,
)

# Which plan list each method fills unless told otherwise (option ``target``).
# visual_mass/vig/lc: the list of the paper that defined them. The hidden-state and
# data-free baselines default to decode bypass, where FlashVLM compares them: they
# score whole layers, and decode bypass is the mode that skips whole layers.
DEFAULT_TARGETS = {
    "visual_mass": "decode_bypass",
    "vig": "vskip",
    "lc": "frozen",
    "cosine": "decode_bypass",
    "angular": "decode_bypass",
    "l2": "decode_bypass",
    "depth": "decode_bypass",
    "random": "decode_bypass",
}
METHODS = tuple(DEFAULT_TARGETS)
DATA_FREE = ("depth", "random")
# Methods that score the patched model, so they can score it under a base plan.
BASE_PLAN_METHODS = ("visual_mass", "vig", "lc")


def _hidden_options(method: str, options: dict[str, Any], target: str) -> dict[str, Any]:
    # Scoring whole-layer change of visual tokens is what ShortV's cosine ablation does
    # when the plan freezes/skips visual work; decode bypass concerns every token.
    default_tokens = "last" if method == "angular" else ("visual" if target in ("vskip", "frozen") else "all")
    allowed: dict[str, Any] = {"target": target, "tokens": default_tokens}
    if method == "angular":
        allowed["n"] = None
    return pop_options(options, method, allowed)


def calibrate(
    model,
    batches: Iterable[dict] | None,
    method: str,
    *,
    budget: int | None = None,
    skip_ratio: float | None = None,
    seed: int = 0,
    max_new_tokens: int = 32,
    progress: bool = True,
    base_plan: SkipPlan | None = None,
    **method_options,
) -> SkipPlan:
    """Score the decoder layers of ``model`` on ``batches`` with ``method`` and pick layers to skip.

    batches: iterable of input dicts (input_ids, attention_mask, pixel_values, image_sizes /
    image_grid_thw, ...), as a processor returns them; left padding. ``depth`` and
    ``random`` need no data (batches may be None). Exactly one of ``budget`` (number of
    layers) or ``skip_ratio`` (k = floor(r * L)) sets how many layers are chosen.

    Methods (lower score = skipped first; plan list filled by default):
      visual_mass -> decode_bypass_layers  FlashVLM A_v over ``max_new_tokens`` greedy tokens.
      vig         -> vskip_layers          V-Skip VIG; options num_samples (20), kl_direction.
      lc          -> frozen_layers         ShortV LC; options num_samples (None = all), kl_direction.
      cosine, l2  -> decode_bypass_layers  options tokens ("all"|"visual"|"text"|"last"), target.
      angular     -> decode_bypass_layers  UIDL block; options n (= budget), tokens ("last"), target.
      depth, random -> decode_bypass_layers  option target.
    Every method takes ``target`` ("decode_bypass", "vskip", "frozen") to fill another list.

    base_plan: a SkipPlan for this model to calibrate on top of (e.g. FastV pruning, then
    ShortV or V-Skip). visual_mass, vig and lc then score the model under it: the reference
    run is the base plan, vig/lc probe layer l as the base plan plus l in vskip/frozen
    (with prune stages every probe is a full forward, L + 1 per sample), and visual_mass
    generates under it. depth and random take it too (their scores ignore the model);
    cosine, l2 and angular do not (ValueError). Layers the base plan already uses score
    +inf and are never chosen: those already in the target list, for vskip/frozen targets
    those in the other prefill list as well (a layer runs one prefill policy), for vig/lc
    the layers whose probe would conflict the same way, and for visual_mass the layers the
    base plan bypasses on decode (they have no decode attention to measure). The returned
    plan holds the base plan's layer lists and prune stages with the chosen layers added;
    ``calibration["base_plan"]`` records the base plan, ``budget`` counts the added layers.
    """
    from ..hf import apply_skip_plan, decoder_layers, language_model, num_decoder_layers

    check_choice("method", method, METHODS)
    num = num_decoder_layers(model)
    k = resolve_budget(num, budget, skip_ratio)
    exclude: set[int] = set()
    if base_plan is not None:
        check_base_plan(base_plan, num)
        if method not in BASE_PLAN_METHODS and method not in DATA_FREE:
            raise ValueError(
                f"base_plan applies to the methods that score the patched model ({', '.join(BASE_PLAN_METHODS)}) "
                f"and to the data-free {' and '.join(DATA_FREE)}; {method!r} scores the unpatched model's hidden states"
            )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    options = dict(method_options)
    target = check_choice("target", options.get("target", DEFAULT_TARGETS[method]), TARGETS)
    record: dict[str, Any] = {}
    field = TARGET_FIELDS[target]
    if base_plan is not None:
        exclude = taken_layers(base_plan, field)
        if method == "vig":
            exclude |= taken_layers(base_plan, "vskip_layers")
        elif method == "lc":
            exclude |= taken_layers(base_plan, "frozen_layers")
        elif method == "visual_mass":
            exclude |= set(base_plan.decode_bypass_layers)
        if k > num - len(exclude):
            raise ValueError(
                f"budget {k} exceeds the {num - len(exclude)} layers the base plan leaves to {method} "
                f"(layers {sorted(exclude)} are taken)"
            )
        record["base_plan"] = plan_summary(base_plan)
    torch.manual_seed(seed)

    if method in DATA_FREE:
        opts = pop_options(options, method, {"target": target})
        from .baselines import depth_scores, random_scores

        scores = depth_scores(num) if method == "depth" else random_scores(num, seed)
        scores = [float("inf") if l in exclude else v for l, v in enumerate(scores)]
        chosen, samples = lowest(scores, k), 0
    elif method in ("cosine", "l2", "angular"):
        opts = _hidden_options(method, options, target)
        from .baselines import best_block, hidden_state_scores
        from .capture import TOKEN_SETS

        check_choice("tokens", opts["tokens"], TOKEN_SETS)
        block = k
        if method == "angular":
            n = opts["n"] if opts["n"] is not None else k
            if isinstance(n, bool) or not isinstance(n, int) or n != k:
                raise ValueError(
                    f"angular skips one block of n consecutive layers, so n must equal the budget ({k}); got n={n!r}"
                )
            if k == 0:
                raise ValueError("angular needs a block of at least one layer: budget/skip_ratio gave 0 layers")
            block = n
            opts["n"] = n
        scores, samples = hidden_state_scores(
            model, decoder_layers(model), batches, method, tokens=opts["tokens"], block=block, show_progress=progress
        )
        chosen = best_block(scores, k) if method == "angular" else lowest(scores, k)
    else:
        if method == "visual_mass":
            opts = pop_options(options, method, {"target": target, "backend": "auto"})
        else:
            opts = pop_options(
                options,
                method,
                {
                    "target": target,
                    "backend": "auto",
                    "kl_direction": "forward",
                    "num_samples": 20 if method == "vig" else None,
                },
            )
            check_choice("kl_direction", opts["kl_direction"], ("forward", "reverse"))
            ns = opts["num_samples"]
            if ns is not None and (isinstance(ns, bool) or not isinstance(ns, int) or ns < 1):
                raise ValueError(f"num_samples must be a positive int or None, got {ns!r}")
        if batches is None:
            raise ValueError(f"method {method!r} needs calibration batches, got None")
        was_training = model.training
        model.eval()
        base = with_layers(base_plan) if base_plan is not None else SkipPlan(num_layers=num)
        handle = apply_skip_plan(model, base, backend=opts["backend"])
        try:
            if method == "visual_mass":
                from .visual_mass import visual_mass_scores

                scores, samples, tokens = visual_mass_scores(
                    model,
                    handle,
                    num,
                    batches,
                    max_new_tokens=max_new_tokens,
                    show_progress=progress,
                    exclude=exclude,
                )
                record.update(max_new_tokens=max_new_tokens, num_tokens=tokens)
            else:
                from .divergence import kl_scores

                policy = "vskip" if method == "vig" else "frozen"
                scores, samples = kl_scores(
                    model,
                    handle,
                    decoder_layers(model),
                    language_model(model),
                    batches,
                    policy=policy,
                    num_samples=opts["num_samples"],
                    kl_direction=opts["kl_direction"],
                    show_progress=progress,
                    base=base,
                    exclude=exclude,
                )
        finally:
            handle.remove()
            model.train(was_training)
        chosen = lowest(scores, k)

    if skip_ratio is not None:
        record["skip_ratio"] = skip_ratio
    return with_layers(
        base_plan if base_plan is not None else SkipPlan(num_layers=num),
        field,
        chosen,
        method=method,
        budget=k,
        scores=[float(s) for s in scores],
        model=model_info(model, num),
        calibration={"seed": seed, "num_samples": samples, "options": opts, **record},
    )
