"""Plugin registration, start-up validation of the plan, and "no plan == no plugin"."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm.entrypoints.llm")  # a bare namespace "vllm" (this folder) does not count

import harness as H

from vskip_kernels.plan import PlanError


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return H.BUILDERS["llava"](str(tmp_path_factory.mktemp("llava")))


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vskip"]
    assert len(eps) == 1 and eps[0].value == "vskip_kernels.vllm:register"
    from vskip_kernels.vllm import register

    register()
    register()  # idempotent: vLLM loads plugins in every process, maybe more than once


def test_empty_plan_is_no_plugin(llava, tmp_path):
    items = H.prompts("llava", 5, seed=3)
    llm = H.make_llm(llava)
    try:
        assert H.plan_state(llm) == ("CPUAttentionBackendImpl", None)
        base, _ = H.generate(llm, items)
    finally:
        H.close(llm)
    empty = H.plan_file(tmp_path, "empty", "llava")
    llm = H.make_llm(llava, empty)
    try:
        assert H.plan_state(llm) == ("CPUAttentionBackendImpl", None)
        same, _ = H.generate(llm, items)
    finally:
        H.close(llm)
    assert same == base


def _bad(llava, value, match):
    with pytest.raises(PlanError, match=match):
        H.make_llm(llava, None, additional_config={"vskip_plan": value} if value is not ... else {"vskip_plam": 1})


def test_bad_plans_fail_at_start_up(llava, tmp_path):
    from vskip_kernels import SkipPlan

    wrong = tmp_path / "wrong_layers.json"
    SkipPlan(num_layers=7, vskip_layers=[1], model={"name_or_path": "other-model"}).save(wrong)
    _bad(llava, str(wrong), r'additional_config\["vskip_plan"\].*other-model with 7 decoder layers.* has 4')
    arch = tmp_path / "arch.json"
    SkipPlan(num_layers=4, vskip_layers=[1], model={"architecture": "Qwen2VLForConditionalGeneration"}).save(arch)
    _bad(llava, str(arch), "made for architecture 'Qwen2VLForConditionalGeneration'")
    _bad(llava, str(tmp_path / "missing.json"), "cannot read plan")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    _bad(llava, str(broken), "not valid JSON")
    _bad(llava, {"format": "vskip-plan/1", "num_layers": 4, "frozen_layers": [9]}, "layer 9, out of range")
    _bad(
        llava, {"format": "vskip-plan/1", "num_layers": 4, "decode_bypass_layers": [0, 1, 2, 3]}, "every decoder layer"
    )
    _bad(llava, 42, "must be a path to a plan JSON file or a plan dict")
    with pytest.raises(PlanError, match="unknown vskip option"):
        H.make_llm(llava, None, additional_config={"vskip_plam": "plan.json"})


def test_plan_given_as_dict_is_applied(llava):
    plan = {"format": "vskip-plan/1", "num_layers": 4, "vskip_layers": [1]}
    llm = H.make_llm(llava, None, additional_config={"vskip_plan": json.loads(json.dumps(plan))})
    try:
        impl, counts = H.plan_state(llm)
        assert impl == "VskipAttentionImpl"
        H.generate(llm, H.prompts("llava", 2, seed=4), n=3)
        assert H.plan_state(llm)[1]["prefill"] >= 1
    finally:
        H.close(llm)


def test_engine_core_in_its_own_process(llava, tmp_path):
    """vLLM's default: the engine core (scheduler, prefix cache) and the model run in another
    process, which loads the plugin itself. Tokens still equal transformers', and blocks holding
    generated tokens are still kept out of the prefix cache."""
    import os
    import subprocess
    import sys

    plan = H.plan_file(tmp_path, "A", "llava", **H.PLAN_A)
    out = tmp_path / "mp.json"
    script = os.path.join(os.path.dirname(os.path.abspath(H.__file__)), "mp_engine.py")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    res = subprocess.run(
        [sys.executable, script, llava, plan, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(out.read_text())
    hf = H.HFReference(llava)
    assert got["tokens"] == hf.tokens(plan, H.prompts("llava", 6, seed=11), 8)
    assert got["cached"] == 2 * H.BLOCK
