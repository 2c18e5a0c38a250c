"""``apply_skip_plan``: one reversible call that puts a SkipPlan into a transformers model."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .._validate import BACKENDS
from ..plan import PlanError, SkipPlan
from . import cache as cache_patch
from . import compat
from .attention import ATTN_NAME, register
from .layers import LayerPatch, check_frozen_capable
from .models import language_model, visual_token_ids
from .state import SkipState, VisualMassRecorder

_HANDLE_ATTR = "_vskip_handle"
_MISSING = object()


def _check_plan(plan, layers) -> None:
    if not isinstance(plan, SkipPlan):
        raise TypeError(f"plan must be a vskip_kernels.SkipPlan, got {type(plan).__name__}")
    plan.validate()
    plan.check_model(len(layers))
    for i in plan.frozen_layers:
        check_frozen_capable(layers[i], i)
    if len(plan.decode_bypass_layers) == len(layers):
        raise PlanError("decode_bypass_layers lists every decoder layer; at least one layer must run on decode steps")


class SkipHandle:
    """Returned by ``apply_skip_plan``; ``remove()`` undoes the patch exactly."""

    def __init__(self, model, lm, state: SkipState):
        self.model = model
        self._lm = lm
        self._state = state
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._layers: list[tuple[torch.nn.Module, object]] = []
        self._attn_modules: list[torch.nn.Module] = []
        self._prev_attn = _MISSING
        self.removed = False

    @property
    def plan(self) -> SkipPlan:
        return self._state.plan

    def set_plan(self, plan: SkipPlan) -> None:
        """Switch to another plan for the same model without re-patching."""
        self._check_live()
        _check_plan(plan, self._lm.layers)
        self._state.set_plan(plan)

    def remove(self) -> None:
        """Restore the model: original forwards, attention implementation, no hooks. Idempotent."""
        if self.removed:
            return
        st = self._state
        st.active = False
        st.clear()
        for h in self._hooks:
            h.remove()
        for layer, saved in self._layers:
            if saved is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = saved
        for attn in self._attn_modules:
            attn.__dict__.pop("_vskip_state", None)
            attn.__dict__.pop("_vskip_layer_idx", None)
        if self._prev_attn is not _MISSING:
            self._lm.config._attn_implementation_internal = self._prev_attn
        for m in (self.model, self._lm):
            if m.__dict__.get(_HANDLE_ATTR) is self:
                del m.__dict__[_HANDLE_ATTR]
        self.removed = True

    def _check_live(self):
        if self.removed:
            raise RuntimeError("this SkipHandle was removed; call apply_skip_plan again")

    @contextlib.contextmanager
    def record_visual_mass(self):
        """Yield a recorder whose ``per_layer[i]`` gets, for every forward call while active,
        the fp32 [B, Hq] visual attention mass of the newest query position in layer i."""
        self._check_live()
        rec = VisualMassRecorder()
        self._state.recorders.append(rec)
        try:
            yield rec
        finally:
            self._state.recorders.remove(rec)

    @contextlib.contextmanager
    def visual_context(self, is_visual: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Say explicitly which positions are visual: is_visual bool [B, N] for the call's
        positions, or [B, cached + N] for all key positions (what decoder layers run by hand
        see). attention_mask: optional 2-D padding mask of the same shape."""
        self._check_live()
        if not isinstance(is_visual, torch.Tensor) or is_visual.dtype != torch.bool or is_visual.dim() != 2:
            raise ValueError(
                f"is_visual must be a bool tensor [B, N], got "
                f"{getattr(is_visual, 'dtype', type(is_visual).__name__)} "
                f"{tuple(getattr(is_visual, 'shape', ()))}"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(is_visual.shape):
                raise ValueError(
                    f"attention_mask must be a 2-D tensor shaped like is_visual {tuple(is_visual.shape)}, "
                    f"got {tuple(getattr(attention_mask, 'shape', ()))}"
                )
            attention_mask = attention_mask.bool()
        prev = self._state.context
        self._state.context = (is_visual, attention_mask)
        try:
            yield
        finally:
            self._state.context = prev


def _call_visual(state: SkipState, args, kwargs) -> None:
    """Pre-hook body: extend (or reset) the visual history with this call's positions."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    cache = compat.get_cache(kwargs)
    cache_patch.attach(cache, state)
    src = input_ids if input_ids is not None else embeds
    if src is None:
        raise ValueError("the patched model needs input_ids or inputs_embeds")
    b, n = src.shape[0], src.shape[1]
    past = state.full_past(cache)
    full = new = None
    if state.context is not None:
        ctx = state.context[0]
        if tuple(ctx.shape) == (b, past + n):
            full = ctx
        elif tuple(ctx.shape) == (b, n):
            new = ctx
    if full is None and new is None:
        if input_ids is None:
            raise ValueError(
                "the model was called with inputs_embeds only, so the patch cannot tell which positions are "
                f"visual; wrap the call in `handle.visual_context(is_visual)` with is_visual [B, N] = [{b}, {n}]"
                + (f" (or [{b}, {past + n}] covering the cache)" if past else "")
            )
        # A token fed back on a decode step is text even when the model emitted a placeholder id:
        # without pixel inputs the model gives it the id's text embedding, not visual features.
        generated = past > 0 and n == 1 and not compat.has_visual_inputs(kwargs)
        new = state.visual_rule.is_visual(input_ids, generated)
    if full is None:
        assert new is not None  # set above whenever full is not
        if past == 0:
            full = new
        else:
            hist = state.history
            if hist is None or hist.shape[1] != past:
                seen = 0 if hist is None else hist.shape[1]
                raise ValueError(
                    f"the cache holds {past} positions but this patched model has tracked {seen}; continue "
                    "only caches filled by this patched model (a forward that raised clears the tracking)"
                )
            if hist.shape[0] != b:
                if b % hist.shape[0]:
                    raise ValueError(f"batch changed from {hist.shape[0]} to {b} with a non-empty cache")
                hist = hist.repeat_interleave(b // hist.shape[0], dim=0)
            full = torch.cat([hist.to(new.device), new.bool()], dim=1)
    state.history = full.bool()
    if state.prune.active:
        call_mask = compat.call_padding_mask(kwargs, state.history.shape[1])
        if state.context is not None and state.context[1] is not None:
            call_mask = state.context[1]
        state.prune.begin_call(state.history, call_mask, past, n)
    state.in_call = True


def apply_skip_plan(model: torch.nn.Module, plan: SkipPlan, *, backend: str = "auto") -> SkipHandle:
    """Put ``plan`` into ``model`` (a transformers VLM or causal LM); returns a SkipHandle.

    Only the language model changes: its attention implementation becomes ``"vskip"``
    (the vision tower keeps its own), frozen layers run their text rows only, and
    decode-bypassed layers return their input on decode steps. Which positions are
    visual comes from ``input_ids`` (the family's image/video token ids) on every call
    of ``model``. A model can carry one patch at a time: patching it again raises
    RuntimeError (use ``handle.set_plan`` or ``handle.remove()`` first).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    compat.warn_if_untested()
    lm = language_model(model)
    for m in (model, lm):
        if m.__dict__.get(_HANDLE_ATTR) is not None:
            raise RuntimeError(
                f"{type(model).__name__} is already patched by vskip_kernels.hf.apply_skip_plan; call "
                "handle.remove() first, or switch plans with handle.set_plan(plan)"
            )
    layers: Any = lm.layers
    _check_plan(plan, layers)
    for i, layer in enumerate(layers):
        if not hasattr(layer, "self_attn"):
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) has no self_attn module")
    register()
    state = SkipState(plan, backend, visual_token_ids(model))
    handle = SkipHandle(model, lm, state)
    try:
        cfg: Any = lm.config
        handle._prev_attn = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = ATTN_NAME
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            attn.__dict__["_vskip_state"] = state
            attn.__dict__["_vskip_layer_idx"] = i
            handle._attn_modules.append(attn)
            saved = layer.__dict__.get("forward", _MISSING)
            patch = LayerPatch(layer, i, state)
            if saved is not _MISSING:  # keep wrappers others installed (e.g. accelerate's device hooks)
                patch.orig = saved
            handle._layers.append((layer, saved))
            layer.__dict__["forward"] = patch

        def pre_hook(module, args, kwargs):
            if state.active:
                state.reset_call()
                _call_visual(state, args, kwargs)

        def post_hook(module, args, kwargs, output):
            state.in_call = False
            state.schedules = {}
            state.prune.end_call()
            if output is None:  # the forward raised: forget everything it may have half-recorded
                state.history = None
                state.prune.clear()
            elif state.active:
                # A cache the model created itself is first seen here.
                cache_patch.attach(compat.output_cache(output), state)

        handle._hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handle._hooks.append(model.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
        model.__dict__[_HANDLE_ATTR] = handle
        lm.__dict__[_HANDLE_ATTR] = handle
    except BaseException:
        handle.remove()
        raise
    return handle
