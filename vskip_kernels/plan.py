"""SkipPlan: which decoder layers run under which policy (DESIGN.md, format "vskip-plan/1")."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_FORMAT = "vskip-plan/1"


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


def _layer_list(name: str, value, num_layers: int) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise PlanError(f"{name} must be a list of layer indices, got {value!r}")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int):
            raise PlanError(f"{name} must hold integer layer indices, got {i!r}")
        if not 0 <= i < num_layers:
            raise PlanError(f"{name} holds layer {i}, out of range for a model with {num_layers} decoder layers")
        out.append(i)
    if len(set(out)) != len(out):
        raise PlanError(f"{name} lists a layer twice: {out}")
    return sorted(out)


@dataclass
class SkipPlan:
    """Layer lists per mode plus how they were chosen.

    vskip_layers: visual queries skip visual keys (V-Skip). frozen_layers: visual
    tokens pass through unchanged (ShortV). decode_bypass_layers: the whole layer is
    skipped on decode steps (FlashVLM). A layer may be in vskip or frozen, not both;
    decode bypass combines with either.
    """

    num_layers: int
    vskip_layers: list[int] = field(default_factory=list)
    frozen_layers: list[int] = field(default_factory=list)
    decode_bypass_layers: list[int] = field(default_factory=list)
    method: str = "manual"
    budget: int | None = None
    scores: list[float] | None = None
    model: dict[str, Any] = field(default_factory=dict)  # name_or_path, architecture, num_layers
    calibration: dict[str, Any] = field(default_factory=dict)  # seed, num_samples, options

    def __post_init__(self):
        self.validate()

    def validate(self) -> SkipPlan:
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers <= 0:
            raise PlanError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        n = self.num_layers
        self.vskip_layers = _layer_list("vskip_layers", self.vskip_layers, n)
        self.frozen_layers = _layer_list("frozen_layers", self.frozen_layers, n)
        self.decode_bypass_layers = _layer_list("decode_bypass_layers", self.decode_bypass_layers, n)
        both = sorted(set(self.vskip_layers) & set(self.frozen_layers))
        if both:
            raise PlanError(
                f"layers {both} are in both vskip_layers and frozen_layers; a layer runs one prefill policy"
            )
        if self.scores is not None:
            if len(self.scores) != n:
                raise PlanError(f"scores must hold one value per layer ({n}), got {len(self.scores)}")
            self.scores = [float(s) for s in self.scores]
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0
        ):
            raise PlanError(f"budget must be a non-negative integer or None, got {self.budget!r}")
        return self

    def policy_for(self, layer: int) -> str:
        if layer in self.vskip_layers:
            return "vskip"
        if layer in self.frozen_layers:
            return "frozen"
        return "dense"

    @property
    def is_empty(self) -> bool:
        return not (self.vskip_layers or self.frozen_layers or self.decode_bypass_layers)

    def check_model(self, num_layers: int, name: str | None = None) -> None:
        """Raise PlanError unless this plan fits a model with ``num_layers`` decoder layers."""
        if num_layers != self.num_layers:
            made_for = self.model.get("name_or_path") or self.model.get("architecture") or "another model"
            raise PlanError(
                f"plan was made for {made_for} with {self.num_layers} decoder layers, but the model "
                f"{name or ''} has {num_layers}".replace("  ", " ")
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipPlan:
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {fmt!r}; expected {PLAN_FORMAT!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise PlanError(f"unknown plan fields {unknown}")
        if "num_layers" not in d:
            raise PlanError("plan is missing 'num_layers'")
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"})
        except TypeError as exc:
            raise PlanError(f"malformed plan: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash never leaves a half-written plan behind."""
        path = os.fspath(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> SkipPlan:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise PlanError(f"cannot read plan {os.fspath(path)!r}: {exc.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {os.fspath(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(d)
