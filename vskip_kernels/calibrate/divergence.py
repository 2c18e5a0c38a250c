"""KL-based layer scores: V-Skip's VIG (policy "vskip") and ShortV's LC (policy "frozen").

score[l] = mean over samples of KL(P_full || P_l), the next-token distributions at the
last prompt position of the dense model and of the model with only layer l under the
policy. ``kl_direction="reverse"`` gives KL(P_l || P_full), which is what ShortV's
public code computes (the paper writes the forward direction).

Cost: L + 1 layer stacks per sample instead of L + 1 full models. One dense forward
records every decoder layer's input and call arguments; for each l the stack is rerun
from layer l's saved input, with layer l under the policy, then the final norm and the
LM head are applied at the last prompt position only.

With a base plan (``calibrate(..., base_plan=...)``) the reference is the model under the
base plan and probe l is the base plan with layer l added to the policy's list. When the
base plan prunes visual tokens, the replay is not possible (layers after a prune stage run
on a compacted sequence, formed inside the patched forward), so every probe is one full
forward of the patched model: L + 1 models per sample.

Positions: the KL is taken at each row's last real prompt position only, never at visual
positions. That is a text token in any chat prompt; under pruning it has to be one (a
dropped visual position carries a stale hidden state to the output), which is checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..plan import SkipPlan
from ._common import iter_batches, last_positions, layer_output, prepare, progress, visual_mask, with_layers
from .capture import last_layer_output, layer_calls

KL_DIRECTIONS = ("forward", "reverse")


def _final_norm(lm):
    norm = getattr(lm, "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of the language model {type(lm).__name__} (expected .norm)")
    return norm


def _head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"cannot find the LM head of {type(model).__name__}")
    return head


def kl(log_p_full: torch.Tensor, log_p_l: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-row KL in fp32 between two [B, V] log-distributions."""
    a, b = (log_p_full, log_p_l) if direction == "forward" else (log_p_l, log_p_full)
    return (a.exp() * (a - b)).sum(-1)


def kl_scores(
    model,
    handle,
    layers,
    lm,
    batches,
    *,
    policy: str,
    num_samples: int | None,
    kl_direction: str,
    show_progress: bool = True,
    base: SkipPlan | None = None,
    exclude: Iterable[int] = (),
) -> tuple[list[float], int]:
    """Returns (mean KL per layer, number of samples used).

    base: the reference plan (None: the dense model); probe l adds layer l to its list of
    ``policy``. Layers in ``exclude`` are not probed; their score is +inf.
    """
    num = len(layers)
    norm, head = _final_norm(lm), _head(model)
    sums = torch.zeros(num, dtype=torch.float64)
    samples = 0
    field = {"vskip": "vskip_layers", "frozen": "frozen_layers"}[policy]
    dense = with_layers(base) if base is not None else SkipPlan(num_layers=num)
    skip = set(exclude)
    probed = [l for l in range(num) if l not in skip]
    plans = {l: with_layers(dense, field, [l]) for l in probed}
    replay = not dense.prune
    name = "vig" if policy == "vskip" else "lc"

    def logp(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        rows = h[torch.arange(h.shape[0], device=h.device), last]
        return F.log_softmax(head(norm(rows)).float(), dim=-1)

    with torch.no_grad():
        for batch in progress(iter_batches(batches), show_progress, f"calibrate[{name}]"):
            if num_samples is not None and samples >= num_samples:
                break
            batch = prepare(batch, model)
            bsz = batch["input_ids"].shape[0]
            take = bsz if num_samples is None else min(bsz, num_samples - samples)
            last = last_positions(batch["attention_mask"])
            is_vis = visual_mask(model, batch["input_ids"])
            if not replay and bool(is_vis.gather(1, last[:, None]).any()):
                raise ValueError(
                    "a calibration prompt ends with a visual token; under the base plan's prune stages its output "
                    "may be a dropped position's stale state, so the divergence needs prompts that end with text"
                )
            handle.set_plan(dense)
            if replay:
                with layer_calls(layers) as (calls, final):
                    model(**batch, use_cache=False)
                ref = logp(final[0], last)
                with handle.visual_context(is_vis, batch["attention_mask"]):
                    for l in probed:
                        handle.set_plan(plans[l])
                        h = calls[l][0]
                        for j in range(l, num):
                            _, args, kw = calls[j]
                            h = layer_output(layers[j](h, *args, **kw))
                        d = kl(ref, logp(h, last), kl_direction)[:take]
                        sums[l] += d.double().sum().cpu()
            else:
                # Full forwards: the patch prunes (and scatters back) inside the model's own loop.
                with last_layer_output(layers) as final:
                    model(**batch, use_cache=False)
                    ref = logp(final[0], last)
                    for l in probed:
                        handle.set_plan(plans[l])
                        model(**batch, use_cache=False)
                        d = kl(ref, logp(final[0], last), kl_direction)[:take]
                        sums[l] += d.double().sum().cpu()
            handle.set_plan(dense)
            samples += take
    if samples == 0:
        raise ValueError("batches is empty: calibration needs at least one sample")
    scores = (sums / samples).tolist()
    return [float("inf") if l in skip else v for l, v in enumerate(scores)], samples
