"""Per-engine state of a model running a plan inside vLLM: per-slot token kinds and the
current step's per-token facts.

Token kinds live per KV-cache *slot* (int8, 0 unused, 1 text, 2 visual), written through the
step's ``slot_mapping`` right before the forward that writes the slot's K/V. So:

* chunked prefill: an image split across scheduler steps has its first part's kinds in the
  slots written by the earlier step, read back through the block table like the K/V;
* prefix caching: a block served from the prefix cache keeps the kinds written when it was
  computed (a cached block is only reused for the same tokens and images, which its hash
  covers), so a cache hit knows its visual positions without recomputing them.

A prompt token is visual when its id is one of the model's image/video placeholder ids, and
generated tokens are text: ``visual_tokens.VisualTokenRule``, shared with the HF integration. A row is a *decode row* when its position is at or past the
request's prompt length: it is a generated token. The last chunk of a chunked prompt, or the
one prompt token left after a prefix-cache hit, is a prefill row even when it is one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds import KIND_TEXT, KIND_VISUAL
from ..plan import SkipPlan
from ..visual_tokens import VisualTokenRule


@dataclass
class StepInfo:
    num_tokens: int  # real (unpadded) tokens of the step
    kinds: torch.Tensor  # int8 [rows] kinds of the step's rows (padding rows: text)
    visual: torch.Tensor  # bool [rows]
    decode: torch.Tensor  # bool [rows] generated-token rows
    any_visual: bool
    any_decode: bool
    all_decode: bool  # a pure decode step: every real row is a decode row


class ModelState:
    """Created when a model with a plan is loaded; read by the attention impl and layer wrappers."""

    def __init__(self, plan: SkipPlan, visual_ids: list[int], layer_names: dict[int, str], kernel: str = "torch"):
        self.plan = plan
        self.kernel = kernel  # the paged kernel the attention impl runs: "torch" or "triton"
        self.kernel_calls = {"torch": 0, "triton": 0}  # paged-kernel calls by kernel (tests read these)
        self.layer_names = dict(layer_names)  # decoder layer index -> attention layer name
        self.policies = {i: plan.policy_for(i) for i in layer_names}
        self.bypass = set(plan.decode_bypass_layers)
        self.step: StepInfo | None = None
        self._slot_kinds: dict[int, torch.Tensor] = {}  # data_ptr of the kv cache tensor -> kinds per slot
        self.visual_rule = VisualTokenRule(visual_ids)
        # steps seen, by kind (tests and logs read these): prefill-only, mixed, pure decode
        self.step_counts = {"prefill": 0, "mixed": 0, "decode": 0}

    # -- slot kinds ----------------------------------------------------------------------
    def slot_kinds_for(self, kv_cache: torch.Tensor, num_slots: int) -> torch.Tensor:
        """The int8 per-slot kinds of the cache tensor ``kv_cache`` (layers sharing a cache share them)."""
        key = kv_cache.data_ptr()
        t = self._slot_kinds.get(key)
        if t is None or t.numel() < num_slots or t.device != kv_cache.device:
            t = torch.zeros(num_slots, dtype=torch.int8, device=kv_cache.device)
            self._slot_kinds[key] = t
        return t

    def token_kinds(self, input_ids: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        vis = self.visual_rule.is_visual(input_ids, generated)
        return torch.where(vis, KIND_VISUAL, KIND_TEXT).to(torch.int8)

    def begin_step(
        self,
        input_ids: torch.Tensor,
        num_tokens: int,
        rows: int,
        decode_rows: torch.Tensor,
        slot_writes: list[tuple[torch.Tensor, torch.Tensor, int]],
    ) -> StepInfo:
        """input_ids [>= num_tokens]: the step's token ids; decode_rows bool [num_tokens];
        slot_writes: (kv_cache, slot_mapping, num_slots) per distinct cache of the decoder layers."""
        kinds = torch.full((rows,), KIND_TEXT, dtype=torch.int8, device=input_ids.device)
        kinds[:num_tokens] = self.token_kinds(input_ids[:num_tokens], decode_rows)
        for kv_cache, slot_mapping, num_slots in slot_writes:
            sk = self.slot_kinds_for(kv_cache, num_slots)
            slots = slot_mapping[:num_tokens].long().to(sk.device)
            ok = slots >= 0
            sk.index_copy_(0, slots[ok], kinds[:num_tokens].to(sk.device)[ok])
        decode = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        decode[:num_tokens] = decode_rows.to(decode.device)
        visual = kinds == KIND_VISUAL
        n_dec = int(decode_rows.sum())
        self.step = StepInfo(
            num_tokens, kinds, visual, decode, bool(visual.any()), n_dec > 0, num_tokens > 0 and n_dec == num_tokens
        )
        kind = "decode" if self.step.all_decode else ("mixed" if n_dec else "prefill")
        self.step_counts[kind] += 1
        return self.step

    def end_step(self) -> None:
        self.step = None
