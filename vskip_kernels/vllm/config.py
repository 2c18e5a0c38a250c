"""Reading a SkipPlan from vLLM's ``additional_config`` and checking it against the model.

Only plain data crosses this module (dicts, the transformers config): what touches vLLM's
internals lives in ``compat.py``.
"""

from __future__ import annotations

import os
from typing import Any

from ..plan import PlanError, SkipPlan

PLAN_KEY = "vskip_plan"
# Other keys of ours in additional_config (reserved prefix: a typo there is an error, not ignored).
OPTION_KEYS = (PLAN_KEY,)
_WHERE = f'additional_config["{PLAN_KEY}"]'


def plan_from_additional_config(additional_config: Any) -> SkipPlan | None:
    """The plan named by ``additional_config["vskip_plan"]`` (a path to a plan JSON file, or the
    plan as a dict), or None when there is none. An empty plan counts as none."""
    if not additional_config:
        return None
    if not isinstance(additional_config, dict):
        additional_config = getattr(additional_config, "__dict__", {}) or {}
    unknown = sorted(
        k for k in additional_config if isinstance(k, str) and k.startswith("vskip") and k not in OPTION_KEYS
    )
    if unknown:
        raise PlanError(f"unknown vskip option(s) {unknown} in additional_config; the option is {PLAN_KEY!r}")
    value = additional_config.get(PLAN_KEY)
    if value is None:
        return None
    if isinstance(value, SkipPlan):
        plan = value
    elif isinstance(value, dict):
        try:
            plan = SkipPlan.from_dict(value)
        except PlanError as exc:
            raise PlanError(f"{_WHERE}: {exc}") from None
    elif isinstance(value, (str, os.PathLike)):
        if not str(value):
            raise PlanError(f"{_WHERE} is an empty path")
        try:
            plan = SkipPlan.load(value)
        except PlanError as exc:
            raise PlanError(f"{_WHERE}: {exc}") from None
    else:
        raise PlanError(f"{_WHERE} must be a path to a plan JSON file or a plan dict, got {type(value).__name__}")
    return None if plan.is_empty else plan


def text_config(hf_config):
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else getattr(hf_config, "text_config", hf_config)


def num_decoder_layers(hf_config) -> int:
    n = getattr(text_config(hf_config), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise PlanError(f"cannot tell the number of decoder layers of {type(hf_config).__name__}")
    return n


def visual_token_ids(hf_config) -> list[int]:
    """The placeholder ids whose positions are visual: image and video tokens (as the HF integration)."""
    ids: list[int] = []
    for attr in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(hf_config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
            ids.append(v)
    return ids


def check_plan_for_model(plan: SkipPlan, hf_config, model_name: str | None = None) -> None:
    """Raise PlanError unless ``plan`` fits the model: layer count, architecture, at least one
    layer left running on decode steps."""
    n = num_decoder_layers(hf_config)
    try:
        plan.check_model(n, model_name)
    except PlanError as exc:
        raise PlanError(f"{_WHERE}: {exc}") from None
    made_for = plan.model.get("architecture") if isinstance(plan.model, dict) else None
    archs = list(getattr(hf_config, "architectures", None) or [])
    if made_for and archs and made_for not in archs:
        raise PlanError(f"{_WHERE}: plan was made for architecture {made_for!r}, but the model is {archs[0]!r}")
    if len(plan.decode_bypass_layers) == n:
        raise PlanError(
            f"{_WHERE}: decode_bypass_layers lists every decoder layer; at least one layer must run on decode steps"
        )
