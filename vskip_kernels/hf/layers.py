"""Decoder-layer forwards for frozen (ShortV) and decode-bypassed (FlashVLM) layers.

The patch overrides ``forward`` on the layer *instance* (``remove()`` deletes the
override): module objects, parameter names, ``state_dict`` keys and any hooks
transformers installed on the layer (e.g. hidden-state capture) stay as they are.
"""

from __future__ import annotations

import inspect

import torch

from .attention import layer_attention
from .compat import get_cache, is_decode_step

_FROZEN_NEEDS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_NEEDS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


def check_frozen_capable(layer, idx: int) -> None:
    missing = [a for a in _FROZEN_NEEDS if not hasattr(layer, a)]
    if not missing:
        missing = [f"self_attn.{a}" for a in _ATTN_NEEDS if not hasattr(layer.self_attn, a)]
    if missing:
        raise TypeError(
            f"frozen_layers needs a Llama-style pre-norm decoder layer; layer {idx} ({type(layer).__name__}) "
            f"lacks {missing}"
        )


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LayerPatch:
    """Callable installed as ``layer.forward``; reads its mode from the shared state on every call."""

    def __init__(self, layer, idx: int, state):
        self.layer = layer
        self.idx = idx
        self.state = state
        self.orig = type(layer).forward.__get__(layer)
        self.sig = inspect.signature(type(layer).forward)

    def _bind(self, args, kwargs) -> dict:
        if not args:
            return kwargs
        bound = self.sig.bind_partial(self.layer, *args, **kwargs)
        out = dict(bound.arguments)
        out.pop("self", None)
        extra = out.pop("kwargs", {})
        out.update(extra)
        return out

    def __call__(self, hidden_states, *args, **kwargs):
        st = self.state
        if not st.active:
            return self.orig(hidden_states, *args, **kwargs)
        kw = self._bind(args, kwargs)
        if st.prune.active and st.in_call:
            hidden_states, kw = st.prune.enter(self.idx, hidden_states, kw)
        return st.prune.leave(self.idx, self._run(hidden_states, kw))

    def _run(self, hidden_states, kw):
        st = self.state
        decode = self._is_decode(hidden_states, kw)
        if decode and st.bypassed(self.idx):
            return hidden_states
        if st.policy(self.idx) == "frozen" and not decode:
            return self._frozen(hidden_states, kw)
        return self.orig(hidden_states, **kw)

    def _is_decode(self, hidden_states, kw) -> bool:
        st = self.state
        cache = get_cache(kw)
        if torch.compiler.is_compiling() and st.in_call and st.history is not None and cache is not None:
            # Traced: the visual history spans the cached and the new positions, so its length
            # answers without reading a StaticCache's length (a host sync, a graph break per layer).
            return hidden_states.shape[1] == 1 and st.history.shape[1] > 1
        return is_decode_step(hidden_states, cache, self.idx)

    def _frozen(self, hidden_states, kw):
        """Visual rows pass through; Q/O projections, attention rows and the FFN run on text rows only."""
        st, layer = self.state, self.layer
        attn = layer.self_attn
        b, n, hdim = hidden_states.shape
        is_visual, ctx_mask = st.current_visual(self.idx)
        L = is_visual.shape[1]
        if is_visual.shape[0] != b or n > L:
            raise ValueError(
                f"the visual mask is {tuple(is_visual.shape)} but layer {self.idx} got hidden states "
                f"{tuple(hidden_states.shape)}"
            )
        q_vis = is_visual[:, L - n :].to(hidden_states.device)
        mask2d = kw.get("attention_mask")
        if mask2d is None:
            mask2d = ctx_mask
        real = q_vis.new_ones(q_vis.shape)
        if mask2d is not None:
            if not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2 or mask2d.shape[1] < L:
                raise ValueError(
                    f"frozen layers expect the 2-D padding mask [B, >= Nk]; got {tuple(getattr(mask2d, 'shape', ()))}"
                )
            real = mask2d[:, L - n : L].to(hidden_states.device).bool()
        compute = (~q_vis) & real
        if bool(compute.all()):
            return self.orig(hidden_states, **kw)

        d = attn.head_dim
        normed = layer.input_layernorm(hidden_states)
        cos, sin = kw["position_embeddings"]
        cos, sin = cos.expand(b, n, -1), sin.expand(b, n, -1)
        k = attn.k_proj(normed).view(b, n, -1, d).transpose(1, 2)
        v = attn.v_proj(normed).view(b, n, -1, d).transpose(1, 2)
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]

        rows = compute.reshape(-1).nonzero().squeeze(1)
        xt = normed.reshape(b * n, hdim).index_select(0, rows)
        qt = attn.q_proj(xt).view(rows.numel(), -1, d)
        hq = qt.shape[1]
        ct = cos.reshape(b * n, d).index_select(0, rows)[:, None]
        stn = sin.reshape(b * n, d).index_select(0, rows)[:, None]
        qt = qt * ct + _rotate_half(qt) * stn

        cache = get_cache(kw)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        # Visual query rows stay zero: the frozen policy gives them no attention row at all.
        q = qt.new_zeros(b * n, hq, d).index_copy(0, rows, qt).view(b, n, hq, d).transpose(1, 2)
        k, v, is_vis_k, mask = st.masks_for(q, k, v, mask2d, self.idx)
        out = layer_attention(st, self.idx, q, k, v, is_vis_k, mask, "frozen", attn.scaling)
        ot = out.transpose(1, 2).reshape(b * n, hq * d).index_select(0, rows)
        h = hidden_states.reshape(b * n, hdim).index_select(0, rows) + attn.o_proj(ot)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return hidden_states.reshape(b * n, hdim).index_copy(0, rows, h.to(hidden_states.dtype)).view(b, n, hdim)
