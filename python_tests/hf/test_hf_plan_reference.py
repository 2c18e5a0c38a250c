"""generate() under a plan with vskip, frozen and decode-bypassed layers equals an independent
reference (the model's own eager attention with the plan imposed by hooks, hf_reference.py),
token by token and logit by logit, on every supported VLM family."""

import pytest
import torch

from python_tests import hf_models as H
from python_tests.hf.generation import assert_same_generation, greedy_steps
from python_tests.hf.hf_reference import plan_hooks
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan

pytestmark = pytest.mark.hf

LAYERS = 5
# Layer 0 bypassed too: transformers sizes masks from layer 0's cache, which then stops growing.
PLAN = dict(vskip_layers=[1, 3], frozen_layers=[2], decode_bypass_layers=[0, 4])
STEPS = 5
ATOL = 1e-4


def _generate(model, inputs, **kw):
    return greedy_steps(model, inputs, STEPS, **kw)


def _reference(fam, inputs, plan=PLAN, **kw):
    ref = H.FACTORIES[fam](layers=LAYERS)
    with (
        plan_hooks(
            ref,
            vskip=plan.get("vskip_layers", ()),
            frozen=plan.get("frozen_layers", ()),
            bypass=plan.get("decode_bypass_layers", ()),
        ),
        torch.no_grad(),
    ):
        return _generate(ref, inputs, **kw)


def _patched(fam, inputs, plan=PLAN, **kw):
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **plan), backend="torch")
    with torch.no_grad():
        return _generate(model, inputs, **kw)


def _assert_same(got, want):
    assert_same_generation(got, want, ATOL)


@pytest.mark.parametrize("fam", H.VLM_FAMILIES)
def test_generate_with_plan_equals_reference(fam):
    inputs = H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[2, 1], pad_extra=[3, 0])
    assert (inputs["attention_mask"] == 0).any()  # left padding is exercised
    want = _reference(fam, inputs)
    _assert_same(_patched(fam, inputs), want)
    # The plan must matter, or this test could not fail: the reference without it differs.
    dense_scores = _reference(fam, inputs, plan={})[1]
    finite = torch.isfinite(want[1])  # min_new_tokens masks EOS with -inf
    assert (dense_scores - want[1])[finite].abs().max() > 100 * ATOL


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_each_policy_alone_equals_reference(fam):
    inputs = H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[1, 2])
    for plan in (dict(vskip_layers=[0, 2]), dict(frozen_layers=[1, 3]), dict(decode_bypass_layers=[2])):
        want = _reference(fam, inputs, plan)
        _assert_same(_patched(fam, inputs, plan), want)


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_static_cache_equals_reference(fam):
    inputs = H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[1, 2], pad_extra=[2, 0])
    _assert_same(_patched(fam, inputs, cache_implementation="static"), _reference(fam, inputs))


@pytest.mark.parametrize("fam", ["llava", "llava_next"])
def test_beam_search_equals_reference(fam):
    inputs = H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[2, 1])
    kw = dict(num_beams=3, num_return_sequences=2, min_new_tokens=STEPS, max_new_tokens=STEPS, do_sample=False)
    ref = H.FACTORIES[fam](layers=LAYERS)
    with plan_hooks(ref, PLAN["vskip_layers"], PLAN["frozen_layers"], PLAN["decode_bypass_layers"]), torch.no_grad():
        want = ref.generate(**inputs, **kw)
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **PLAN), backend="torch")
    with torch.no_grad():
        got = model.generate(**inputs, **kw)
    assert torch.equal(got, want)


def test_one_token_prompt_is_a_prefill_not_a_decode_step():
    """A one-token first call has no cache behind it: bypassed layers must run on it."""
    model, ref = H.tiny_llama(layers=LAYERS), H.tiny_llama(layers=LAYERS)
    inputs = {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}
    plan = dict(decode_bypass_layers=[0, 2])
    with plan_hooks(ref, bypass=plan["decode_bypass_layers"]), torch.no_grad():
        want = _generate(ref, inputs)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **plan), backend="torch")
    with torch.no_grad():
        _assert_same(_generate(model, inputs), want)


def test_empty_plan_generates_the_unpatched_tokens():
    fam = "llava"
    inputs = H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[2, 1], pad_extra=[3, 0])
    plain = H.FACTORIES[fam](layers=LAYERS)
    with torch.no_grad():
        want = _generate(plain, inputs)
    _assert_same(_patched(fam, inputs, plan={}), want)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_remove_restores_identical_generation(fam):
    model = H.FACTORIES[fam](layers=LAYERS)
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    with torch.no_grad():
        before = _generate(model, inputs)
        handle = apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **PLAN), backend="torch")
        during = _generate(model, inputs)
        handle.remove()
        after = _generate(model, inputs)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    finite = torch.isfinite(before[1])
    assert (during[1] - before[1])[finite].abs().max() > 100 * ATOL
