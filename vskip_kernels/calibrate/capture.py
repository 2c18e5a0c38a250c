"""Hooks on the decoder layers: the hidden state entering each layer, and leaving the last one."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._common import last_positions, layer_input, layer_output, visual_mask

TOKEN_SETS = ("all", "visual", "text", "last")


def token_selection(model, batch: dict, tokens: str) -> torch.Tensor:
    """[B, N] bool: the real tokens a per-token measure averages over."""
    real = batch["attention_mask"].bool()
    if tokens == "all":
        return real
    if tokens == "last":
        sel = torch.zeros_like(real)
        sel[torch.arange(real.shape[0], device=real.device), last_positions(batch["attention_mask"])] = True
        return sel & real
    vis = visual_mask(model, batch["input_ids"])
    return real & vis if tokens == "visual" else real & ~vis


@contextmanager
def boundary_states(layers, select):
    """Collect x_0..x_L: the input of each decoder layer and the output of the last one.

    ``select(h)`` reduces a [B, N, H] state to what the caller keeps (e.g. the selected
    tokens in fp32), so full-sequence states of every layer never pile up in memory.
    Yields a list that holds the L + 1 reduced states after a forward pass.
    """
    states: list = [None] * (len(layers) + 1)
    hooks = []

    def pre(i):
        def hook(module, args, kwargs):
            states[i] = select(layer_input(args, kwargs))

        return hook

    def post(module, args, kwargs, out):
        states[-1] = select(layer_output(out))

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layers[-1].register_forward_hook(post, with_kwargs=True))
        yield states
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def layer_calls(layers):
    """Record each decoder layer's (hidden_states, kwargs) so it can be re-run by hand.

    kwargs hold what the model passed the layer (position embeddings, masks, position
    ids, cache flags); they are kept by reference, not copied.
    """
    calls: list = [None] * len(layers)
    final: list = [None]
    hooks = []

    def pre(i):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            kw.pop("hidden_states", None)
            calls[i] = (layer_input(args, kwargs), tuple(args[1:]), kw)

        return hook

    def post(module, args, kwargs, out):
        final[0] = layer_output(out)

    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layers[-1].register_forward_hook(post, with_kwargs=True))
        yield calls, final
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def last_layer_output(layers):
    """The output of the last decoder layer of the latest forward pass, in a one-item list."""
    final: list = [None]

    def post(module, args, kwargs, out):
        final[0] = layer_output(out)

    hook = layers[-1].register_forward_hook(post, with_kwargs=True)
    try:
        yield final
    finally:
        hook.remove()
