"""Per-model state of a patched model: which cached positions are visual, schedules, recorders.

One ``SkipState`` per ``apply_skip_plan`` call, reached from the patched modules through
attributes, so two patched models never share it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..ops.dispatch import resolve_backend
from ..plan import SkipPlan
from ..schedule import plan_schedule
from ..visual_tokens import VisualTokenRule
from . import compat
from .prune import PruneTracker


class VisualMassRecorder:
    """Collects, per decoder layer, one fp32 [B, Hq] tensor per forward call: the visual
    attention mass of the newest query position."""

    def __init__(self):
        self.per_layer: dict[int, list[torch.Tensor]] = defaultdict(list)

    def _add(self, layer: int, mass: torch.Tensor) -> None:
        self.per_layer[layer].append(mass.detach().float())


class SkipState:
    def __init__(self, plan: SkipPlan, backend: str, visual_ids: list[int]):
        self.plan = plan
        self.prune = PruneTracker(plan)
        self.backend = backend
        self.visual_rule = VisualTokenRule(visual_ids)
        # Modality of every position the cache holds (plus the current call's), [B, L] bool.
        self.history: torch.Tensor | None = None
        self.in_call = False
        self.context: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.recorders: list[VisualMassRecorder] = []
        self.schedules: dict = {}
        self.active = True

    # -- plan -------------------------------------------------------------------------
    def set_plan(self, plan: SkipPlan) -> None:
        """Switch plans; the visual history stays (a cache may continue under the new plan)."""
        self.plan = plan
        self.prune = PruneTracker(plan)
        self.schedules = {}

    def policy(self, layer: int) -> str:
        return self.plan.policy_for(layer)

    def bypassed(self, layer: int) -> bool:
        return layer in self.plan.decode_bypass_layers

    def reference_layer(self) -> int:
        """A layer whose cache grows on every step (length source for mask sizes)."""
        byp = set(self.plan.decode_bypass_layers)
        return next(i for i in range(self.plan.num_layers) if i not in byp)

    def full_past(self, cache) -> int:
        """Positions of the full sequence (the model's numbering) cached before a call."""
        ref = self.reference_layer()
        tracked = None if self.history is None else self.history.shape[1]
        n = compat.past_length(cache, ref, tracked)
        if n and not torch.compiler.is_compiling():
            n += self.prune.offset(ref)
        return n

    # -- visual masks ---------------------------------------------------------------------
    def reset_call(self) -> None:
        self.schedules = {}

    def clear(self) -> None:
        self.history = None
        self.in_call = False
        self.schedules = {}
        self.prune.clear()

    def current_visual(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(is_visual [B, L], context padding mask or None) for the keys of ``layer`` in the running
        call; a layer after a prune stage sees its segment's kept positions (its mask comes with
        the layer's kwargs)."""
        if self.in_call:
            seg = self.prune.visual(layer)
            if seg is not None:
                return seg[0], None
            if self.history is None:
                raise RuntimeError("internal error: no visual history inside a patched forward")
            return self.history, None
        if self.context is not None:
            return self.context
        raise ValueError(
            "vskip attention does not know which positions are visual: call the patched top-level model "
            "with input_ids, or wrap the call in `handle.visual_context(is_visual, attention_mask)` when "
            "running decoder layers by hand or passing only inputs_embeds"
        )

    def masks_for(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, layer: int):
        """Keys/values cut to the L known positions, is_visual [B, L] and the 2-D padding mask [B, L]."""
        is_visual, ctx_mask = self.current_visual(layer)
        b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
        L = is_visual.shape[1]
        if is_visual.shape[0] != b:
            raise ValueError(
                f"the visual mask covers {is_visual.shape[0]} sequences but layer {layer} got a batch of {b}"
            )
        if nk < L:
            hint = (
                " (a decode-bypassed layer missed decode steps; it cannot run again on a cache that kept growing)"
                if self.bypassed(layer)
                else ""
            )
            raise ValueError(f"layer {layer} has {nk} keys but the sequence has {L} positions{hint}")
        if nq > L:
            raise ValueError(f"layer {layer} has {nq} queries but the visual mask covers only {L} positions")
        if nk > L:  # StaticCache: keys beyond the filled length are unused slots
            key, value = key[:, :, :L], value[:, :, :L]
        mask = attention_mask if attention_mask is not None else ctx_mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "vskip attention expects the 2-D padding mask [B, Nk] (1 = token, 0 = padding); got "
                    f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}. Prepared 4-D masks are "
                    "not supported: pass the 2-D attention_mask"
                )
            if mask.shape[1] < L or mask.shape[0] != b:
                raise ValueError(f"attention_mask is {tuple(mask.shape)} but layer {layer} needs [{b}, >= {L}]")
            mask = mask[:, :L].to(device=query.device)
            if mask.is_floating_point():
                mask = mask != 0
        return key, value, is_visual.to(query.device), mask

    def schedule_for(self, is_visual, mask, query, policy, layer: int):
        """A tile schedule shared by every layer of this policy and prune segment in the running
        call (triton only)."""
        if resolve_backend(self.backend, query.device) != "triton":
            return None
        nq, nk = query.shape[2], is_visual.shape[1]
        key = (policy, self.prune.segment(layer), nq, nk, query.shape[3], query.dtype, query.device)
        sched = self.schedules.get(key) if self.in_call else None
        if sched is None:
            sched = plan_schedule(is_visual, mask, nq=nq, policy=policy, visual_self=True, like=query)
            if self.in_call:
                self.schedules[key] = sched
        return sched

    def record(self, layer: int, mass: torch.Tensor) -> None:
        for r in self.recorders:
            r._add(layer, mass)
