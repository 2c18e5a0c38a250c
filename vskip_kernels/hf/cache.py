"""Per-instance adjustments of a transformers Cache used by a patched model.

A decode-bypassed layer's cache stops growing, but transformers sizes masks and
positions from layer 0's cache (``get_seq_length()``, ``get_mask_sizes(q, 0)``,
``get_query_offset(0)``). Those calls are redirected to a layer that runs on every
step. Beam search reorders the cache with ``reorder_cache``; the visual history is
reordered with it. Only the given cache object is changed, and the redirection stops
when the patch is removed.
"""

from __future__ import annotations

import types

from . import compat

_ATTR = "_vskip_cache_patch"


def _redirect(state, idx):
    if state.active and state.plan.decode_bypass_layers and idx in state.plan.decode_bypass_layers:
        return state.reference_layer()
    return idx


def attach(cache, state) -> None:
    if not compat.is_cache(cache):
        return
    if getattr(cache, _ATTR, None) is state:
        return
    prev = getattr(cache, _ATTR, None)
    if prev is not None:
        # The cache moved to another patched model: start from the class methods again.
        for name in compat.MASK_SIZING_METHODS:
            cache.__dict__.pop(name, None)
    compat.check_cache_methods(cache)
    cls = type(cache)

    def get_seq_length(self, layer_idx: int = 0):
        return cls.get_seq_length(self, _redirect(state, layer_idx))

    def get_mask_sizes(self, query_length, layer_idx):
        return cls.get_mask_sizes(self, query_length, _redirect(state, layer_idx))

    def get_query_offset(self, layer_idx: int = 0):
        return cls.get_query_offset(self, _redirect(state, layer_idx))

    def reorder_cache(self, beam_idx):
        out = cls.reorder_cache(self, beam_idx)
        if state.active and state.history is not None:
            state.history = state.history.index_select(0, beam_idx.to(state.history.device))
        return out

    cache.get_seq_length = types.MethodType(get_seq_length, cache)
    cache.get_mask_sizes = types.MethodType(get_mask_sizes, cache)
    cache.get_query_offset = types.MethodType(get_query_offset, cache)
    cache.reorder_cache = types.MethodType(reorder_cache, cache)
    setattr(cache, _ATTR, state)
