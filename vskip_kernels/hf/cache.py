"""Per-instance adjustments of a transformers Cache used by a patched model.

A decode-bypassed layer's cache stops growing, but transformers sizes masks and
positions from layer 0's cache (``get_seq_length()``, ``get_mask_sizes(q, 0)``,
``get_query_offset(0)``). Those calls are redirected to a layer that runs on every
step, and when that layer holds a pruned (compacted) sequence, the positions pruning took
out of it are added back, so positions keep the full sequence's numbering. Beam search reorders the cache with ``reorder_cache``; the visual history is
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


def _offset(state, cache, idx) -> int:
    """Positions a pruned layer's cache lacks against the full sequence (0 while it is empty)."""
    if not (state.active and state.prune.active):
        return 0
    off = state.prune.offset(idx)
    return off if off and compat.cache_layer_length(cache, idx) > 0 else 0


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
        idx = _redirect(state, layer_idx)
        return cls.get_seq_length(self, idx) + _offset(state, self, idx)

    def get_mask_sizes(self, query_length, layer_idx):
        idx = _redirect(state, layer_idx)
        kv_length, kv_offset = cls.get_mask_sizes(self, query_length, idx)
        return kv_length + _offset(state, self, idx), kv_offset

    def get_query_offset(self, layer_idx: int = 0):
        return cls.get_query_offset(self, _redirect(state, layer_idx))

    def reorder_cache(self, beam_idx):
        out = cls.reorder_cache(self, beam_idx)
        if state.active and state.history is not None:
            state.history = state.history.index_select(0, beam_idx.to(state.history.device))
            state.prune.reorder(beam_idx)
        return out

    cache.get_seq_length = types.MethodType(get_seq_length, cache)
    cache.get_mask_sizes = types.MethodType(get_mask_sizes, cache)
    cache.get_query_offset = types.MethodType(get_query_offset, cache)
    cache.reorder_cache = types.MethodType(reorder_cache, cache)
    setattr(cache, _ATTR, state)
