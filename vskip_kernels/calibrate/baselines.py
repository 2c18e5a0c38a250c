"""Baseline layer scores users compare against. Lower score = skipped first.

- cosine (ShortGPT's Block Influence): 1 - cos(x_in, x_out), averaged over tokens.
- l2 (FlashVLM eq. 3): | ||x_in|| - ||x_out|| |, averaged over tokens.
- angular (UIDL): arccos(cos(x_l, x_{l+n})) / pi; one block of n consecutive layers
  is skipped, the block starting at argmin. UIDL measures the final token only, so
  ``tokens="last"`` is its default.
- depth (early exit): deepest layers first.
- random: a seeded random order.
"""

from __future__ import annotations

import math

import torch

from ._common import iter_batches, prepare, progress
from .capture import boundary_states, token_selection


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Computed in fp64 from fp32 states: arccos near 1 amplifies rounding in the cosine.
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def hidden_state_scores(
    model, layers, batches, metric: str, *, tokens: str, block: int = 1, show_progress: bool = True
) -> tuple[list[float], int]:
    """Per-layer score of ``metric`` in {"cosine", "l2", "angular"} over the selected tokens.

    For angular, entry l compares x_l with x_{min(l + block, L)}: blocks that would run
    past the last layer are truncated there (the caller only picks full blocks).
    Returns (scores, number of samples).
    """
    num = len(layers)
    sums = torch.zeros(num, dtype=torch.float64)
    count = 0
    samples = 0
    with torch.no_grad():
        for batch in progress(iter_batches(batches), show_progress, f"calibrate[{metric}]"):
            batch = prepare(batch, model)
            sel = token_selection(model, batch, tokens)
            n_sel = int(sel.sum())
            if n_sel == 0:
                raise ValueError(
                    f"a calibration batch has no {tokens!r} tokens to average {metric} over"
                    + (" (no visual tokens: is this a text-only batch?)" if tokens == "visual" else "")
                )
            with boundary_states(layers, lambda h: h[sel].float()) as xs:
                model(**batch, use_cache=False)
            for l in range(num):
                a = xs[l]
                if metric == "angular":
                    b = xs[min(l + block, num)]
                    v = torch.arccos(_cos(a, b).clamp(-1.0, 1.0)) / math.pi
                elif metric == "cosine":
                    v = 1.0 - _cos(a, xs[l + 1])
                else:
                    v = (a.double().norm(dim=-1) - xs[l + 1].double().norm(dim=-1)).abs()
                sums[l] += v.sum().cpu()
            count += n_sel
            samples += batch["input_ids"].shape[0]
    if samples == 0:
        raise ValueError("batches is empty: calibration needs at least one sample")
    return (sums / count).tolist(), samples


def best_block(scores: list[float], n: int) -> list[int]:
    """UIDL: the n consecutive layers starting where the block distance is smallest."""
    starts = range(len(scores) - n + 1)
    s = min(starts, key=lambda i: (scores[i], i))
    return list(range(s, s + n))


def depth_scores(num_layers: int) -> list[float]:
    return [float(num_layers - 1 - i) for i in range(num_layers)]


def random_scores(num_layers: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(num_layers, generator=g, dtype=torch.float64).tolist()
