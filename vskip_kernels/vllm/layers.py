"""Frozen (ShortV) and decode-bypassed (FlashVLM) decoder layers inside vLLM.

vLLM's Llama-style decoder layers take and return ``(hidden_states, residual)`` with the
residual add fused into the norms: the layer's true input is ``hidden_states + residual``
(``hidden_states`` alone when ``residual`` is None, the first layer), and so is its output.
A row "left unchanged" therefore comes back as ``(0, true input)`` (or ``(input, None)``
when the whole step passes through).

The wrapper is installed as ``forward`` on the layer *instance*; parameters and names stay.
"""

from __future__ import annotations

import torch

from ..plan import PlanError

_FROZEN_NEEDS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")


def check_frozen_capable(layer, idx: int) -> None:
    missing = [a for a in _FROZEN_NEEDS if not hasattr(layer, a)]
    if missing:
        raise PlanError(
            f"frozen_layers needs a Llama-style pre-norm decoder layer; layer {idx} "
            f"({type(layer).__name__}) lacks {missing}"
        )


class LayerWrapper:
    """``layer.forward`` for a decoder layer that the plan freezes or bypasses on decode rows."""

    def __init__(self, layer, idx: int, state, orig, attention_text_rows):
        # attention_text_rows(attn, positions, h, text_rows) -> attention output of the text rows;
        # it knows vLLM's attention blocks, so it comes from compat.py (which imports this module)
        self.attention_text_rows = attention_text_rows
        self.layer = layer
        self.idx = idx
        self.state = state
        self.orig = orig
        self.frozen = state.policies.get(idx) == "frozen"
        self.bypass = idx in state.bypass

    def __call__(self, positions, hidden_states, residual=None, *args, **kwargs):
        step = self.state.step
        if step is None:  # warm-up / profiling runs: plain layer
            return self.orig(positions, hidden_states, residual, *args, **kwargs)
        if self.bypass and step.any_decode:
            if step.all_decode:
                return hidden_states, residual
            return self._bypass_decode_rows(step, positions, hidden_states, residual, args, kwargs)
        return self._run(step, positions, hidden_states, residual, args, kwargs)

    def _run(self, step, positions, hidden_states, residual, args, kwargs):
        if self.frozen and step.any_visual:
            return self._frozen(step, positions, hidden_states, residual)
        return self.orig(positions, hidden_states, residual, *args, **kwargs)

    def _bypass_decode_rows(self, step, positions, hidden_states, residual, args, kwargs):
        """Mixed step: prefill rows run the layer, decode rows keep their input."""
        rows = hidden_states.shape[0]
        idx = step.decode[:rows].nonzero().flatten().to(hidden_states.device)
        keep_h = hidden_states.index_select(0, idx)  # copies: the fused norms work in place
        keep_r = residual.index_select(0, idx) if residual is not None else torch.zeros_like(keep_h)
        h, r = self._run(step, positions, hidden_states, residual, args, kwargs)
        return h.index_copy(0, idx, keep_h.to(h.dtype)), r.index_copy(0, idx, keep_r.to(r.dtype))

    def _frozen(self, step, positions, hidden_states, residual):
        """Visual rows pass through; attention rows (policy "frozen"), the O projection and the FFN run
        for text rows only. K/V are still computed and written for every row: later text rows attend them."""
        layer = self.layer
        rows = hidden_states.shape[0]
        if residual is None:
            residual = hidden_states
            h = layer.input_layernorm(hidden_states)
        else:
            h, residual = layer.input_layernorm(hidden_states, residual)
        text = (~step.visual[:rows]).nonzero().flatten().to(hidden_states.device)
        a_t = self.attention_text_rows(layer.self_attn, positions, h, text)
        if text.numel() == 0:
            return torch.zeros_like(residual), residual
        r_t = residual.index_select(0, text)
        h_t, r_t = layer.post_attention_layernorm(a_t, r_t)
        h_t = layer.mlp(h_t)
        out_h = torch.zeros_like(residual).index_copy(0, text, h_t.to(residual.dtype))
        out_r = residual.index_copy(0, text, r_t.to(residual.dtype))
        return out_h, out_r
