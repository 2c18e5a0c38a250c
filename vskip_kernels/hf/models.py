"""Where the language model, its decoder layers and its visual token ids live in each family."""

from __future__ import annotations

from typing import Any, cast

from torch import nn

# Attribute paths from a top-level model to the language model, most specific first:
# VLMs (LLaVA*, Qwen2-VL, Qwen2.5-VL) keep it at model.language_model, causal LMs at
# .model, and a bare decoder (LlamaModel, Qwen2VLTextModel) is its own language model.
_LM_PATHS = (("model", "language_model"), ("language_model",), ("model",), ())


def _has_layers(m) -> bool:
    return isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "config")


def language_model(model: nn.Module) -> nn.Module:
    """The decoder-only language model inside ``model`` (the module owning ``.layers``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path in _LM_PATHS:
        m: Any = model
        for name in path:
            m = getattr(m, name, None)
            if m is None:
                break
        if m is not None and _has_layers(m):
            return m
    raise TypeError(
        f"cannot find the language model of {type(model).__name__}: expected a decoder with a `.layers` "
        "ModuleList at model.model.language_model, model.language_model, model.model or model itself"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (never the vision tower's blocks)."""
    return cast(nn.ModuleList, language_model(model).layers)  # _has_layers checked the type


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def visual_token_ids(model: nn.Module) -> list[int]:
    """Placeholder ids whose positions hold visual features: the image token, plus the
    video token for families that have one (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision).
    Empty for text-only models."""
    cfg = getattr(model, "config", None)
    ids = []
    for attr in ("image_token_id", "video_token_id"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
            ids.append(v)
    return ids
