"""``calibrate(..., base_plan=...)``: VIG / LC / visual mass scored on the model under a base plan
(FastV-style pruning, other layer lists), against full forwards of explicitly built plans."""

import json
import math

import pytest
import torch

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.calibrate import calibrate
from vskip_kernels.hf import apply_skip_plan
from vskip_kernels.plan import PlanError, PruneStage

pytestmark = pytest.mark.hf

LAYERS = 5
FASTV = [PruneStage(layer=2, keep=0.5)]


@pytest.fixture(scope="module")
def llava():
    model = H.FACTORIES["llava"](seed=0, layers=LAYERS)
    with torch.no_grad():
        # Sharper next-token distributions: the KLs (1e-4 otherwise) stand far above fp32 rounding.
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def batch(llava):
    return H.make_inputs(llava, batch=2, seed=3)


def _kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _last_logp(model, handle, plan, batch):
    """Next-token log-probs at the last prompt position (left padding: the last column) under ``plan``."""
    handle.set_plan(plan)
    with torch.no_grad():
        return torch.log_softmax(model(**batch, use_cache=False).logits[:, -1].double(), -1)


def _want_kl(model, batch, base_kwargs, field, direction="forward", skip=()):
    """Mean KL(P_base || P_{base + layer l in field}) per layer from full forwards of plans built here."""
    handle = apply_skip_plan(model, SkipPlan(num_layers=LAYERS))
    want = []
    try:
        ref = _last_logp(model, handle, SkipPlan(num_layers=LAYERS, **base_kwargs), batch)
        for l in range(LAYERS):
            if l in skip:
                want.append(math.inf)
                continue
            kw = dict(base_kwargs)
            kw[field] = sorted(set(kw.get(field, [])) | {l})
            pert = _last_logp(model, handle, SkipPlan(num_layers=LAYERS, **kw), batch)
            want.append(float((_kl(ref, pert) if direction == "forward" else _kl(pert, ref)).mean()))
    finally:
        handle.remove()
    return want


@pytest.mark.parametrize(
    "method,field,direction",
    [("lc", "frozen_layers", "forward"), ("vig", "vskip_layers", "reverse")],
)
def test_kl_scores_on_pruned_model_match_full_runs(llava, batch, method, field, direction):
    base = SkipPlan(num_layers=LAYERS, prune=[PruneStage(layer=2, keep=0.5)])
    plan = calibrate(llava, [batch], method, budget=1, base_plan=base, kl_direction=direction, progress=False)
    want = _want_kl(llava, batch, {"prune": [PruneStage(layer=2, keep=0.5)]}, field, direction)
    assert max(want) > 1e-3  # the probes visibly move this model's output
    assert plan.scores == pytest.approx(want, rel=1e-3, abs=1e-7)
    assert plan.prune == base.prune and plan.prune is not base.prune
    assert getattr(plan, field) == [min(range(LAYERS), key=lambda i: (want[i], i))]
    other = {"frozen_layers", "vskip_layers", "decode_bypass_layers"} - {field}
    assert all(getattr(plan, f) == [] for f in other)
    assert plan.method == method and plan.budget == 1
    assert plan.calibration["base_plan"]["prune"] == [{"layer": 2, "keep": 0.5, "rank": "last"}]
    assert base.frozen_layers == [] and base.vskip_layers == []  # the base plan is not modified

    # The base plan matters: the scores of the dense model differ.
    dense = calibrate(llava, [batch], method, budget=1, kl_direction=direction, progress=False)
    assert dense.scores != pytest.approx(plan.scores, rel=1e-2, abs=1e-7)


def test_base_layer_lists_are_kept_and_taken_layers_excluded(llava, batch):
    """Base plan with prune stages and every layer list: the lc probes add to its frozen layers;
    layers already vskip or frozen are not probed (+inf) and not chosen."""
    base_kwargs = {
        "vskip_layers": [3],
        "frozen_layers": [1],
        "decode_bypass_layers": [4],
        "prune": [PruneStage(layer=2, keep=0.5, rank="mean")],
    }
    base = SkipPlan(num_layers=LAYERS, **base_kwargs)
    plan = calibrate(llava, [batch], "lc", budget=2, base_plan=base, progress=False)
    want = _want_kl(llava, batch, base_kwargs, "frozen_layers", skip={1, 3})
    assert plan.scores == pytest.approx(want, rel=1e-3, abs=1e-7)
    assert plan.scores[1] == plan.scores[3] == math.inf
    finite = [i for i in range(LAYERS) if i not in (1, 3)]
    assert plan.frozen_layers == sorted([1, *sorted(finite, key=lambda i: (want[i], i))[:2]])
    assert plan.vskip_layers == [3] and plan.decode_bypass_layers == [4] and plan.prune == base.prune
    with pytest.raises(ValueError, match="budget 4 exceeds the 3 layers"):
        calibrate(llava, [batch], "lc", budget=4, base_plan=base, progress=False)


def test_vig_on_unpruned_base_plan_replay_matches_full_runs(llava, batch):
    """No prune stages: the replay path, with the base plan's frozen layer (replayed after the
    probed layers before it) in the reference and in every probe."""
    base = SkipPlan(num_layers=LAYERS, frozen_layers=[3])
    plan = calibrate(llava, [batch], "vig", budget=1, base_plan=base, progress=False)
    want = _want_kl(llava, batch, {"frozen_layers": [3]}, "vskip_layers", skip={3})
    assert plan.scores == pytest.approx(want, rel=1e-3, abs=1e-7)
    assert plan.frozen_layers == [3] and plan.vskip_layers == [min(range(LAYERS), key=lambda i: (want[i], i))]


def test_visual_mass_under_vtw_and_bypass(llava, batch):
    """VTW (keep=0) at layer 2: layers 2.. attend no visual key, so their mass is exactly 0; the
    base plan's decode-bypassed layer records no decode step and scores +inf."""
    base = SkipPlan(num_layers=LAYERS, decode_bypass_layers=[3], prune=[PruneStage(layer=2, keep=0.0)])
    plan = calibrate(llava, [batch], "visual_mass", budget=2, base_plan=base, max_new_tokens=3, progress=False)
    assert plan.scores[0] > 0.01 and plan.scores[1] > 0.01
    assert plan.scores[2] == plan.scores[4] == 0.0 and plan.scores[3] == math.inf
    assert plan.decode_bypass_layers == [2, 3, 4] and plan.prune == base.prune and plan.budget == 2
    dense = calibrate(llava, [batch], "visual_mass", budget=2, max_new_tokens=3, progress=False)
    assert min(dense.scores) > 0.01


def test_data_free_with_base_plan_and_json(llava, tmp_path):
    base = SkipPlan(num_layers=LAYERS, decode_bypass_layers=[4], frozen_layers=[2], prune=FASTV)
    plan = calibrate(llava, None, "depth", budget=2, base_plan=base)
    assert plan.decode_bypass_layers == [2, 3, 4] and plan.frozen_layers == [2]
    assert plan.scores == [4.0, 3.0, 2.0, 1.0, math.inf]
    fr = calibrate(llava, None, "depth", budget=2, base_plan=base, target="frozen")
    assert fr.frozen_layers == [2, 3, 4] and fr.scores == [4.0, 3.0, math.inf, 1.0, 0.0]
    plan.save(tmp_path / "p.json")
    again = SkipPlan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict()
    assert json.loads((tmp_path / "p.json").read_text())["calibration"]["base_plan"]["frozen_layers"] == [2]


def test_base_plan_errors(llava, batch):
    base = SkipPlan(num_layers=LAYERS, prune=FASTV)
    with pytest.raises(TypeError, match="base_plan must be a vskip_kernels.SkipPlan"):
        calibrate(llava, [batch], "lc", budget=1, base_plan=base.to_dict(), progress=False)
    with pytest.raises(PlanError, match="4 decoder layers, but the model"):
        calibrate(llava, [batch], "lc", budget=1, base_plan=SkipPlan(num_layers=4), progress=False)
    for method in ("cosine", "l2", "angular"):
        with pytest.raises(ValueError, match="base_plan applies to"):
            calibrate(llava, [batch], method, budget=1, base_plan=base, progress=False)
    # Under pruning the divergence is read at the last prompt position, which must be text.
    ends_visual = {k: v[:, :-2] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
    assert bool((ends_visual["input_ids"][:, -1] == H.IMAGE_ID).all())
    with pytest.raises(ValueError, match="ends with a visual token"):
        calibrate(llava, [ends_visual], "vig", budget=1, base_plan=base, progress=False)


def test_cli_base_plan(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vskip_kernels.cli import main
    from vskip_kernels.tinyvlm import build_model, build_processor

    build_model(num_layers=4, seed=0).save_pretrained(tmp_path / "model")
    build_processor().save_pretrained(tmp_path / "model")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "i.png", "prompt": "what is this?"}) + "\n")
    SkipPlan(num_layers=4, prune=[PruneStage(layer=1, keep=0.25)]).save(tmp_path / "fastv.json")
    argv = ["calibrate", "--model", tmp_path / "model", "--data", tmp_path / "data.jsonl", "--method", "lc"]
    argv += ["--budget", "1", "--base-plan", tmp_path / "fastv.json", "-o", tmp_path / "out.json", "--no-progress"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    plan = SkipPlan.load(tmp_path / "out.json")
    assert plan.prune == [PruneStage(layer=1, keep=0.25)] and len(plan.frozen_layers) == 1
    assert plan.calibration["base_plan"]["prune"] == [{"layer": 1, "keep": 0.25, "rank": "last"}]
