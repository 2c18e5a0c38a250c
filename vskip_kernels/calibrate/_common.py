"""Plumbing shared by the calibration methods: budgets, batches, masks, progress."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

import torch

TARGETS = ("decode_bypass", "vskip", "frozen")
TARGET_FIELDS = {"decode_bypass": "decode_bypass_layers", "vskip": "vskip_layers", "frozen": "frozen_layers"}
PLAN_LISTS = ("vskip_layers", "frozen_layers", "decode_bypass_layers")


def resolve_budget(num_layers: int, budget, skip_ratio) -> int:
    """Number of layers to pick: ``budget`` itself, or FlashVLM's k = floor(r * L)."""
    if (budget is None) == (skip_ratio is None):
        raise ValueError("give exactly one of budget (a number of layers) or skip_ratio (a fraction of the layers)")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int number of layers, got {budget!r}")
        if not 0 <= budget <= num_layers:
            raise ValueError(
                f"budget must be in [0, {num_layers}] for a model with {num_layers} decoder layers, got {budget}"
            )
        return budget
    if isinstance(skip_ratio, bool) or not isinstance(skip_ratio, (int, float)):
        raise TypeError(f"skip_ratio must be a number in [0, 1], got {skip_ratio!r}")
    if not (math.isfinite(skip_ratio) and 0.0 <= skip_ratio <= 1.0):
        raise ValueError(f"skip_ratio must be in [0, 1], got {skip_ratio!r}")
    # Exact decimal arithmetic: with floats, floor(0.29 * 100) would give 28.
    return math.floor(Fraction(repr(float(skip_ratio))) * num_layers)


def check_base_plan(base_plan, num_layers: int):
    """``base_plan`` itself, checked: a SkipPlan that fits a model with ``num_layers`` layers."""
    from ..plan import SkipPlan

    if not isinstance(base_plan, SkipPlan):
        raise TypeError(f"base_plan must be a vskip_kernels.SkipPlan, got {type(base_plan).__name__}")
    base_plan.validate()
    base_plan.check_model(num_layers)
    return base_plan


def with_layers(base, field: str | None = None, layers: Iterable[int] = (), **meta):
    """A new SkipPlan holding ``base``'s layer lists and prune stages (copies), with ``layers``
    added to the list ``field`` (e.g. "vskip_layers"); ``meta`` (method, scores, ...) goes to
    the SkipPlan as is, none of ``base``'s is kept."""
    from ..plan import PruneStage, SkipPlan

    lists: dict[str, Any] = {f: list(getattr(base, f)) for f in PLAN_LISTS}
    if field is not None:
        lists[field] = sorted(set(lists[field]) | set(layers))
    stages = [PruneStage(s.layer, s.keep, s.rank) for s in base.prune]
    return SkipPlan(num_layers=base.num_layers, prune=stages, **lists, **meta)


def taken_layers(base, field: str) -> set[int]:
    """Layers of ``base`` that cannot be added to its list ``field`` (already there, or, for
    vskip/frozen, in the other prefill list: a layer runs one prefill policy)."""
    if field == "decode_bypass_layers":
        return set(base.decode_bypass_layers)
    return set(base.vskip_layers) | set(base.frozen_layers)


def plan_summary(base) -> dict[str, Any]:
    """What a calibration record keeps of a base plan: its layer lists, prune stages and method."""
    d = base.to_dict()
    return {k: d[k] for k in ("method", "budget", *PLAN_LISTS, "prune")}


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the k lowest scores; ties go to the shallower layer (stable order)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


def progress(iterable, enabled: bool, desc: str, total: int | None = None):
    """One bar per task on a terminal; nothing when stderr is not one (CI logs, pipes)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def iter_batches(batches) -> Iterator[dict[str, Any]]:
    if batches is None:
        raise ValueError(
            "batches must be an iterable of input dicts (input_ids, attention_mask, pixel_values, ...), got None"
        )
    if isinstance(batches, dict):
        raise TypeError("batches must be an iterable of input dicts; wrap a single batch in a list: [batch]")
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of input dicts, got {type(batches).__name__}") from None
    for i, b in enumerate(it):
        if not isinstance(b, dict) and not hasattr(b, "keys"):
            raise TypeError(f"batch {i} must be a dict of model inputs, got {type(b).__name__}")
        if "input_ids" not in b:
            raise ValueError(f"batch {i} has no input_ids; calibration needs token ids to find the visual tokens")
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"batch {i}: input_ids must be a [B, N] tensor, got {getattr(ids, 'shape', type(ids))}")
        yield dict(b)


def prepare(batch: dict[str, Any], model) -> dict[str, Any]:
    """Move tensors to the model's device; floating inputs (pixels) take the model's dtype."""
    dev, dt = model_device(model), model_dtype(model)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dev, dtype=dt) if v.is_floating_point() else v.to(dev)
        out[k] = v
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    from ..hf import visual_token_ids

    ids = list(visual_token_ids(model))
    if not ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    n = attention_mask.shape[1]
    pos = torch.arange(n, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1)


def model_info(model, num_layers: int) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {
        "name_or_path": getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or "",
        "architecture": archs[0],
        "num_layers": num_layers,
    }


def layer_output(out):
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def pop_options(options: dict[str, Any], method: str, allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes options {sorted(allowed) or 'none'}, got unknown {unknown}")
    return {k: options.get(k, v) for k, v in allowed.items()}


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
