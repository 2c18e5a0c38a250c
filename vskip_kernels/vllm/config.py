"""Reading a SkipPlan from vLLM's ``additional_config`` and checking it against the model.

Only plain data crosses this module (dicts, the transformers config): what touches vLLM's
internals lives in ``compat.py``.
"""

from __future__ import annotations

import os
from typing import Any

from ..plan import PlanError, SkipPlan

PLAN_KEY = "vskip_plan"
# Which paged kernel the attention backend runs: "auto" (Triton on CUDA, PyTorch on CPU),
# "torch" or "triton" (on CPU only under TRITON_INTERPRET=1, Triton's interpreter).
KERNEL_KEY = "vskip_backend"
KERNELS = ("auto", "torch", "triton")
# Our keys in additional_config (reserved prefix: a typo there is an error, not ignored).
OPTION_KEYS = (PLAN_KEY, KERNEL_KEY)
_WHERE = f'additional_config["{PLAN_KEY}"]'
_KERNEL_WHERE = f'additional_config["{KERNEL_KEY}"]'


def _as_dict(additional_config: Any) -> dict:
    if not additional_config:
        return {}
    if not isinstance(additional_config, dict):
        return getattr(additional_config, "__dict__", {}) or {}
    return additional_config


def _check_keys(additional_config: dict) -> None:
    unknown = sorted(
        k for k in additional_config if isinstance(k, str) and k.startswith("vskip") and k not in OPTION_KEYS
    )
    if unknown:
        raise PlanError(f"unknown vskip option(s) {unknown} in additional_config; the options are {list(OPTION_KEYS)}")


def kernel_choice(additional_config: Any) -> str:
    """The value of ``additional_config["vskip_backend"]`` ("auto" when absent), checked."""
    ac = _as_dict(additional_config)
    _check_keys(ac)
    value = ac.get(KERNEL_KEY)
    if value is None:
        return "auto"
    if not isinstance(value, str) or value.lower() not in KERNELS:
        raise PlanError(f"{_KERNEL_WHERE} must be one of {list(KERNELS)}, got {value!r}")
    return value.lower()


def resolve_kernel(choice: str, on_cuda: bool, interpreter: bool) -> str:
    """The paged kernel the backend runs: "torch" or "triton".

    ``on_cuda``: the engine runs on vLLM's CUDA platform; ``interpreter``: TRITON_INTERPRET=1 is set
    (the Triton kernel then runs on CPU tensors in Triton's interpreter)."""
    if choice not in KERNELS:
        raise PlanError(f"{_KERNEL_WHERE} must be one of {list(KERNELS)}, got {choice!r}")
    if choice == "auto":
        return "triton" if on_cuda else "torch"
    if choice == "triton" and not on_cuda and not interpreter:
        raise PlanError(
            f"{_KERNEL_WHERE} = \"triton\" on vLLM's CPU platform runs the paged Triton kernel in Triton's "
            'interpreter, which needs TRITON_INTERPRET=1 in the environment before start-up; set it, or use "torch" '
            'or "auto"'
        )
    return choice


def plan_from_additional_config(additional_config: Any) -> SkipPlan | None:
    """The plan named by ``additional_config["vskip_plan"]`` (a path to a plan JSON file, or the
    plan as a dict), or None when there is none. An empty plan counts as none."""
    additional_config = _as_dict(additional_config)
    if not additional_config:
        return None
    _check_keys(additional_config)
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
    if plan.prune:
        raise PlanError(
            f"{_WHERE}: the plan has prune stages (layers {[s.layer for s in plan.prune]}), which the vLLM backend "
            "does not run: chunked prefill and prefix caching conflict with ranking on the last prompt token "
            "(docs/DESIGN.md, 'Token pruning and vLLM'). Run pruned plans with the Hugging Face drop-in, or remove "
            "the stages"
        )
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
