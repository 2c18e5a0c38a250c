"""SkipPlan: JSON round trip, validation, atomic save, model mismatch."""

import json
import os

import pytest

from vskip_kernels import SkipPlan
from vskip_kernels.plan import PLAN_FORMAT, PlanError, PruneStage


def _plan(**kw):
    base = dict(
        num_layers=8,
        vskip_layers=[5, 3],
        frozen_layers=[6],
        decode_bypass_layers=[7, 6],
        method="vig",
        budget=2,
        scores=[0.1 * i for i in range(8)],
        model={"name_or_path": "tiny", "architecture": "LlavaForConditionalGeneration", "num_layers": 8},
        calibration={"seed": 0, "num_samples": 4},
    )
    base.update(kw)
    return SkipPlan(**base)


def test_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PLAN_FORMAT
    assert data["vskip_layers"] == [3, 5]  # stored sorted
    again = SkipPlan.load(path)
    assert again == plan
    assert again.policy_for(3) == "vskip" and again.policy_for(6) == "frozen" and again.policy_for(0) == "dense"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(vskip_layers=[8]), r"vskip_layers holds layer 8, out of range .* 8 decoder layers"),
        (dict(frozen_layers=[-1]), r"frozen_layers holds layer -1"),
        (dict(decode_bypass_layers=[1, 1]), r"lists a layer twice"),
        (dict(vskip_layers=[2], frozen_layers=[2]), r"layers \[2\] are in both vskip_layers and frozen_layers"),
        (dict(num_layers=0), r"num_layers must be a positive integer"),
        (dict(scores=[1.0]), r"scores must hold one value per layer \(8\)"),
        (dict(vskip_layers=["3"]), r"integer layer indices"),
        (dict(vskip_layers=3), r"must be a list of layer indices"),
        (dict(budget=-1), r"budget must be a non-negative integer"),
    ],
)
def test_invalid_plans(kw, match):
    with pytest.raises(PlanError, match=match):
        _plan(**kw)


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PlanError, match="cannot read plan"):
        SkipPlan.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="is not valid JSON"):
        SkipPlan.load(bad)
    d = _plan().to_dict()
    for mutate, match in [
        (lambda d: d.update(format="vskip-plan/0"), "unsupported plan format 'vskip-plan/0'"),
        (lambda d: d.pop("format"), "unsupported plan format None"),
        (lambda d: d.pop("num_layers"), "missing 'num_layers'"),
        (lambda d: d.update(extra=1), r"unknown plan fields \['extra'\]"),
        (lambda d: d.update(vskip_layers=[99]), "out of range"),
    ]:
        dd = json.loads(json.dumps(d))
        mutate(dd)
        bad.write_text(json.dumps(dd))
        with pytest.raises(PlanError, match=match):
            SkipPlan.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(PlanError, match="must be a JSON object"):
        SkipPlan.load(bad)


def test_check_model():
    plan = _plan()
    plan.check_model(8)
    with pytest.raises(PlanError, match="made for tiny with 8 decoder layers, but the model .*has 32"):
        plan.check_model(32)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    _plan().save(path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _plan(method="lc").save(path)
    # the old plan is intact and no temporary file is left behind
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_empty_plan():
    assert SkipPlan(num_layers=4).is_empty
    assert not _plan().is_empty


def test_prune_stages_round_trip_as_json(tmp_path):
    plan = _plan(prune=[{"layer": 2, "keep": 0.5}, PruneStage(layer=5, keep=0.25, rank="mean")])
    assert plan.prune == [PruneStage(2, 0.5, "last"), PruneStage(5, 0.25, "mean")]
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["prune"] == [{"layer": 2, "keep": 0.5, "rank": "last"}, {"layer": 5, "keep": 0.25, "rank": "mean"}]
    again = SkipPlan.load(path)
    assert again == plan and not again.is_empty
    assert again.prune_stage_at(5) == PruneStage(5, 0.25, "mean") and again.prune_stage_at(3) is None
    assert SkipPlan(num_layers=4, prune=[{"layer": 1, "keep": 0}]).prune[0].keep == 0.0  # VTW
    assert SkipPlan(num_layers=4, prune=[{"layer": 0, "keep": 0.0}]).prune[0].layer == 0


@pytest.mark.parametrize(
    "prune, match",
    [
        ([{"layer": 8, "keep": 0.5}], r"prune\[0\]: layer 8 is out of range for a model with 8"),
        ([{"layer": -1, "keep": 0.5}], "out of range"),
        ([{"layer": 0, "keep": 0.5}], "layer 0 with keep=0.5 has no earlier layer to rank"),
        ([{"layer": 2, "keep": 1.5}], r"keep must be a fraction in \[0, 1\]"),
        ([{"layer": 2, "keep": -0.1}], r"keep must be a fraction in \[0, 1\]"),
        ([{"layer": 2, "keep": True}], "keep must be a fraction"),
        ([{"layer": 2, "keep": 0.5, "rank": "max"}], "rank must be one of"),
        ([{"layer": 2.0, "keep": 0.5}], "layer must be an integer"),
        ([{"layer": 3, "keep": 0.5}, {"layer": 3, "keep": 0.25}], "strictly increasing layers, got 3 then 3"),
        ([{"layer": 4, "keep": 0.5}, {"layer": 2, "keep": 0.25}], "strictly increasing layers, got 4 then 2"),
        ([{"layer": 2, "keep": 0.25}, {"layer": 4, "keep": 0.5}], "cannot keep more than an earlier stage"),
        ([{"layer": 2}], "must be an object with 'layer', 'keep'"),
        ([{"layer": 2, "keep": 0.5, "ratio": 1}], "must be an object with 'layer', 'keep'"),
        ([3], r"prune\[0\] must be a PruneStage or a dict"),
        ({"layer": 2, "keep": 0.5}, "prune must be a list of stages"),
    ],
)
def test_invalid_prune_stages(prune, match):
    with pytest.raises(PlanError, match=match):
        _plan(prune=prune)


def test_unchoosable_layer_scores_are_strict_json_null(tmp_path):
    """A calibration on a base plan scores the layers it cannot choose +inf; the file stays strict JSON."""
    plan = _plan(scores=[0.5, float("inf"), 0.1, 0.2, float("inf"), 0.3, 0.4, 0.0])
    path = tmp_path / "plan.json"
    plan.save(path)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data["scores"][1] is None and data["scores"][4] is None and data["scores"][2] == 0.1
    assert SkipPlan.load(path).scores == plan.scores


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), "x"])
def test_invalid_scores(bad):
    with pytest.raises(PlanError, match="scores must"):
        _plan(scores=[bad] + [0.0] * 7)
