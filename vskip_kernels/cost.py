"""Counted cost of a plan: decoder prefill FLOPs and KV-cache bytes, the same on every machine.

What is counted, per decoder layer, on one prompt: the Q and O projections and the FFN
(SwiGLU: three matmuls) of every row the layer computes; the K and V projections of every
token the layer holds; 4·D·Hq FLOPs per allowed (query, key) entry of attention (QKᵀ and
PV). Not counted: norms, rotary embeddings, softmax, the LM head, the vision tower, and the
ranking of a prune stage (one pass over layer K-1's keys, under 0.1% of a 7B layer).

Rows and tokens per layer follow the plan: a frozen layer computes text rows only but
holds every token's K and V; a vskip visual row attends the earlier text keys and itself;
from a prune stage on, a layer holds only the kept tokens. Which visual tokens a stage
keeps depends on the ranking; the count takes them evenly spaced among those remaining.
Only attention entries depend on that choice (their positions), a small share of a
layer's FLOPs at these lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import SkipPlan


@dataclass(frozen=True)
class DecoderDims:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg) -> DecoderDims:
        """From a transformers text config (a VLM's ``get_text_config()``)."""
        heads = cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        )


@dataclass(frozen=True)
class PrefillCost:
    flops: int  # decoder FLOPs of the prompt
    kv_bytes: int  # KV cache after the prompt, all layers
    tokens_per_layer: tuple[int, ...]  # tokens each layer holds (its KV length)


def _evenly(positions: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return positions[:0]
    if k >= positions.numel():
        return positions
    return positions[torch.linspace(0, positions.numel() - 1, k).round().long()]


def prefill_cost(plan: SkipPlan | None, is_visual, dims: DecoderDims, kv_bytes_per_elem: int = 2) -> PrefillCost:
    """Counted cost of one prompt (``is_visual``: a 1-D bool sequence, True at visual positions)
    under ``plan`` (None: dense)."""
    vis0 = torch.as_tensor(is_visual, dtype=torch.bool).flatten()
    if plan is not None:
        plan.check_model(dims.num_layers)
    n_visual = int(vis0.sum())
    present = torch.ones_like(vis0)
    h, d = dims.hidden, dims.head_dim
    q_dim, kv_dim = dims.heads * d, dims.kv_heads * d
    per_row = 2 * h * q_dim * 2 + 3 * 2 * h * dims.intermediate  # Q, O and the FFN
    per_token = 2 * h * kv_dim * 2  # K and V
    per_entry = 4 * d * dims.heads
    flops, tokens = 0, []
    for layer in range(dims.num_layers):
        stage = plan.prune_stage_at(layer) if plan is not None else None
        if stage is not None:
            remaining = (present & vis0).nonzero().squeeze(1)
            present = present.clone()
            present[remaining] = False
            present[_evenly(remaining, stage.kept(n_visual))] = True
        vis = present & vis0
        policy = plan.policy_for(layer) if plan is not None else "dense"
        keys = torch.cumsum(present.long(), 0)  # keys j <= i the layer holds
        text_keys = torch.cumsum((present & ~vis).long(), 0)
        if policy == "vskip":
            entries = torch.where(vis, text_keys + 1, keys)
        elif policy == "frozen":
            entries = torch.where(vis, torch.zeros_like(keys), keys)
        else:
            entries = keys
        rows = present & ~vis if policy == "frozen" else present
        n_tok = int(present.sum())
        flops += per_row * int(rows.sum()) + per_token * n_tok + per_entry * int(entries[present].sum())
        tokens.append(n_tok)
    kv = sum(tokens) * 2 * kv_dim * kv_bytes_per_elem
    return PrefillCost(flops=flops, kv_bytes=kv, tokens_per_layer=tuple(tokens))
