"""Skip-It's redundancy measures, per decoder layer, as diagnostics next to a plan.

- visual_attention_ratio[l]: share of attention that prompt text queries placed after
  the first visual token put on visual keys, averaged over heads and those queries
  (text before any image has nothing visual to look at, so it would only dilute it).
- visual_cosine_distance[l] / text_cosine_distance[l]: 1 - cos between a token's hidden
  state entering and leaving layer l, averaged over visual / text tokens (Skip-It's
  geometric redundancy between adjacent layers).

The ratio needs every prompt query's attention row, which the one-pass mass kernel
(newest query only) does not report, so the language model runs eager attention here
and each layer's probabilities are reduced and dropped as soon as the layer returns.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._common import iter_batches, prepare, progress, visual_mask
from .capture import boundary_states


@contextmanager
def _eager_attention(lm):
    cfg = lm.config
    old = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation_internal = old


@contextmanager
def _attention_ratio_hooks(layers, is_vis: torch.Tensor, queries: torch.Tensor, sums: torch.Tensor):
    """Reduce each layer's [B, H, N, N] probabilities to sum over queries of mean-over-heads visual mass."""
    hooks = []

    def make(i):
        def hook(module, args, out):
            probs = out[1]
            if probs is None:
                raise RuntimeError("eager attention returned no attention probabilities")
            vis = (probs.float() * is_vis[:, None, None, :].to(probs.device)).sum(-1).mean(1)  # [B, N]
            sums[i] += (vis * queries).sum().double().cpu()
            return (out[0], None) + tuple(out[2:])

        return hook

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.self_attn.register_forward_hook(make(i)))
        yield
    finally:
        for h in hooks:
            h.remove()


def diagnostics(model, batches, *, progress_bar: bool = True) -> dict:
    """Per-layer Skip-It measures over ``batches`` (input dicts, as for ``calibrate``).

    Returns {"visual_attention_ratio": [L], "visual_cosine_distance": [L],
    "text_cosine_distance": [L], "num_samples": int}. A measure with no token to average
    over (e.g. no visual tokens) is reported as NaN.
    """
    from ..hf import decoder_layers, language_model

    layers = decoder_layers(model)
    lm = language_model(model)
    num = len(layers)
    var_sum = torch.zeros(num, dtype=torch.float64)
    var_cnt = 0
    dist = {"visual": torch.zeros(num, dtype=torch.float64), "text": torch.zeros(num, dtype=torch.float64)}
    cnt = {"visual": 0, "text": 0}
    samples = 0
    with torch.no_grad():
        for batch in progress(iter_batches(batches), progress_bar, "diagnostics"):
            batch = prepare(batch, model)
            real = batch["attention_mask"].bool()
            is_vis = visual_mask(model, batch["input_ids"]) & real
            seen_visual = is_vis.long().cumsum(1) > 0
            queries = (real & ~is_vis & seen_visual).to(torch.float32)
            kinds = torch.where(is_vis, 1, torch.where(real, 0, -1))  # 1 visual, 0 text, -1 padding
            with (
                _eager_attention(lm),
                _attention_ratio_hooks(layers, is_vis, queries, var_sum),
                boundary_states(layers, lambda h: h.float()) as xs,
            ):
                model(**batch, use_cache=False)
            for name, code in (("visual", 1), ("text", 0)):
                sel = kinds == code
                n = int(sel.sum())
                if n == 0:
                    continue
                for l in range(num):
                    a, b = xs[l][sel].double(), xs[l + 1][sel].double()
                    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
                    dist[name][l] += (1.0 - cos).sum().cpu()
                cnt[name] += n
            var_cnt += int(queries.sum())
            samples += batch["input_ids"].shape[0]
    if samples == 0:
        raise ValueError("batches is empty: diagnostics need at least one sample")
    nan = [float("nan")] * num
    return {
        "visual_attention_ratio": (var_sum / var_cnt).tolist() if var_cnt else nan,
        "visual_cosine_distance": (dist["visual"] / cnt["visual"]).tolist() if cnt["visual"] else nan,
        "text_cosine_distance": (dist["text"] / cnt["text"]).tolist() if cnt["text"] else nan,
        "num_samples": samples,
    }
