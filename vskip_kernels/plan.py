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


PRUNE_RANKS = ("last", "mean")


@dataclass
class PruneStage:
    """Visual-token pruning at the input of decoder layer ``layer`` (FastV, VTW, PyramidDrop).

    Each sequence keeps ``round(keep * n_visual)`` of its visual tokens (``n_visual`` counted in
    the prompt, all images and frames together; ``keep`` is a fraction of that original count
    in every stage) and the others leave the model for layers ``layer``..L-1: no row, no key,
    no KV entry. The kept ones are those receiving the most head-averaged attention in layer
    ``layer - 1``, from the last prompt token (``rank="last"``: FastV's code, PyramidDrop) or
    averaged over every prompt query that may attend them (``rank="mean"``: the FastV paper);
    ties go to the lower position. ``keep=0`` withdraws all of them (VTW) and ranks nothing.
    """

    layer: int
    keep: float
    rank: str = "last"

    def validate(self, num_layers: int, where: str = "prune stage") -> PruneStage:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise PlanError(f"{where}: layer must be an integer layer index, got {self.layer!r}")
        if not 0 <= self.layer < num_layers:
            raise PlanError(f"{where}: layer {self.layer} is out of range for a model with {num_layers} decoder layers")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 <= self.keep <= 1.0:
            raise PlanError(f"{where}: keep must be a fraction in [0, 1] of the visual tokens, got {self.keep!r}")
        self.keep = float(self.keep)
        if self.rank not in PRUNE_RANKS:
            raise PlanError(f"{where}: rank must be one of {PRUNE_RANKS}, got {self.rank!r}")
        if self.layer == 0 and self.keep > 0:
            raise PlanError(
                f"{where}: layer 0 with keep={self.keep} has no earlier layer to rank the visual tokens by; "
                "prune at a later layer, or use keep=0 (withdraw every visual token, VTW)"
            )
        return self

    def kept(self, n_visual: int) -> int:
        """How many of ``n_visual`` visual tokens this stage keeps (Python's round: half to even)."""
        return round(self.keep * n_visual)


def _prune_stages(value, num_layers: int) -> list[PruneStage]:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise PlanError(f"prune must be a list of stages, got {value!r}")
    stages = []
    for i, st in enumerate(value):
        where = f"prune[{i}]"
        if isinstance(st, dict):
            unknown = sorted(set(st) - {"layer", "keep", "rank"})
            if unknown or "layer" not in st or "keep" not in st:
                raise PlanError(
                    f"{where} must be an object with 'layer', 'keep' and optionally 'rank', got {sorted(st)}"
                )
            st = PruneStage(**st)
        elif not isinstance(st, PruneStage):
            raise PlanError(f"{where} must be a PruneStage or a dict, got {type(st).__name__}")
        stages.append(st.validate(num_layers, where))
    for i in range(1, len(stages)):
        a, b = stages[i - 1], stages[i]
        if b.layer <= a.layer:
            raise PlanError(f"prune stages must have strictly increasing layers, got {a.layer} then {b.layer}")
        if b.keep > a.keep:
            raise PlanError(
                f"prune stages cannot keep more than an earlier stage (keep is a fraction of the original "
                f"visual tokens): layer {a.layer} keeps {a.keep}, layer {b.layer} keeps {b.keep}"
            )
    return stages


@dataclass
class SkipPlan:
    """Layer lists per mode plus how they were chosen.

    vskip_layers: visual queries skip visual keys (V-Skip). frozen_layers: visual
    tokens pass through unchanged (ShortV). decode_bypass_layers: the whole layer is
    skipped on decode steps (FlashVLM). A layer may be in vskip or frozen, not both;
    decode bypass combines with either. prune: visual-token pruning stages (PruneStage); the
    layer modes above apply to the tokens that remain.
    """

    num_layers: int
    vskip_layers: list[int] = field(default_factory=list)
    frozen_layers: list[int] = field(default_factory=list)
    decode_bypass_layers: list[int] = field(default_factory=list)
    prune: list[PruneStage] = field(default_factory=list)
    method: str = "manual"
    budget: int | None = None
    scores: list[float] | None = None  # +inf: a layer the calibration could not choose (JSON null)
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
        self.prune = _prune_stages(self.prune, n)
        both = sorted(set(self.vskip_layers) & set(self.frozen_layers))
        if both:
            raise PlanError(
                f"layers {both} are in both vskip_layers and frozen_layers; a layer runs one prefill policy"
            )
        if self.scores is not None:
            if len(self.scores) != n:
                raise PlanError(f"scores must hold one value per layer ({n}), got {len(self.scores)}")
            try:
                self.scores = [float("inf") if s is None else float(s) for s in self.scores]
            except (TypeError, ValueError):
                raise PlanError(
                    f"scores must be numbers (or null for a layer that cannot be chosen), got {self.scores}"
                ) from None
            if any(s != s or s == float("-inf") for s in self.scores):
                raise PlanError(f"scores must not hold NaN or -inf, got {self.scores}")
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
        return not (self.vskip_layers or self.frozen_layers or self.decode_bypass_layers or self.prune)

    def prune_stage_at(self, layer: int) -> PruneStage | None:
        """The stage that prunes at the input of ``layer``, if any."""
        return next((s for s in self.prune if s.layer == layer), None)

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
        if d["scores"] is not None:  # strict JSON has no Infinity: an unchoosable layer is null
            d["scores"] = [None if s == float("inf") else s for s in d["scores"]]
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
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
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
