"""Hardening of the Hugging Face patch: plans that do not fit the model, repeated
patch/remove cycles, beam expansion on an M-RoPE model, two patched models driven step by
step in turn, and bitwise determinism of patched models (torch backend)."""

import pytest
import torch

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan, decoder_layers, language_model
from vskip_kernels.hf.compat import cache_kwargs, output_cache
from vskip_kernels.plan import PlanError

pytestmark = pytest.mark.hf

PLAN = dict(num_layers=3, vskip_layers=[0], frozen_layers=[1], decode_bypass_layers=[2])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def untouched(model, impl):
    return (
        all("forward" not in layer.__dict__ for layer in decoder_layers(model))
        and language_model(model).config._attn_implementation == impl
        and "_vskip_handle" not in model.__dict__
    )


@pytest.mark.parametrize(
    "plan, match",
    [
        (lambda: SkipPlan(num_layers=5, frozen_layers=[4]), "5 decoder layers"),
        (lambda: SkipPlan(num_layers=2, vskip_layers=[1]), "2 decoder layers"),
        (
            lambda: SkipPlan.from_dict(dict(SkipPlan(num_layers=4, decode_bypass_layers=[3]).to_dict())),
            "4 decoder layers",
        ),
    ],
    ids=["frozen-5_layers", "vskip-2_layers", "bypass-4_layers_from_dict"],
)
def test_plan_for_another_layer_count(plan, match):
    model = H.tiny_qwen2_vl()
    impl = language_model(model).config._attn_implementation
    with pytest.raises(PlanError, match=match):
        apply_skip_plan(model, plan())
    assert untouched(model, impl)
    apply_skip_plan(model, SkipPlan(num_layers=3)).remove()  # nothing half-applied


@pytest.mark.parametrize("field", ("vskip_layers", "frozen_layers", "decode_bypass_layers"))
@pytest.mark.parametrize("bad", (3, -1))
def test_out_of_range_layer(field, bad):
    """A plan edited after construction is re-validated: one clear error, model untouched."""
    model = H.tiny_llava()
    impl = language_model(model).config._attn_implementation
    plan = SkipPlan(num_layers=3)
    getattr(plan, field).append(bad)
    with pytest.raises(PlanError, match=rf"{field} holds layer {bad}, out of range for a model with 3"):
        apply_skip_plan(model, plan)
    assert untouched(model, impl)


def test_set_plan_out_of_range_keeps_the_old_plan():
    model = H.tiny_llava()
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    handle = apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    before = logits(model, inputs)
    bad = SkipPlan(num_layers=3)
    bad.frozen_layers.append(7)
    with pytest.raises(PlanError, match="frozen_layers holds layer 7"):
        handle.set_plan(bad)
    assert handle.plan.frozen_layers == [1]
    assert torch.equal(logits(model, inputs), before)


def test_patch_remove_patch_identical_logits():
    """Every cycle gives bit-identical logits: patched runs equal each other, unpatched runs
    equal the original model."""
    model = H.tiny_llava_onevision()
    inputs = H.make_inputs(model, batch=2, images=[2, 1])
    plain = logits(model, inputs)
    patched = []
    for _ in range(3):
        handle = apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
        patched.append(logits(model, inputs))
        handle.remove()
        assert torch.equal(logits(model, inputs), plain)
    assert not torch.equal(patched[0], plain)
    assert all(torch.equal(p, patched[0]) for p in patched[1:])


def test_patched_model_bitwise_deterministic():
    model = H.tiny_qwen2_5_vl()
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    assert torch.equal(logits(model, inputs), logits(model, inputs))
    a = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    b = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert torch.equal(a, b)


def test_return_sequences_on_mrope_model_and_greedy_refusal():
    """num_return_sequences > 1 without sampling: beams expand the visual history on an M-RoPE
    model; greedy search refuses it (transformers' error) and leaves the patch usable."""
    model = H.tiny_qwen2_vl()
    handle = apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[2, 1])
    n = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**inputs, do_sample=False, num_return_sequences=3, max_new_tokens=2)
    assert not handle._state.in_call
    out = model.generate(**inputs, do_sample=False, num_beams=3, num_return_sequences=3, max_new_tokens=3)
    assert out.shape[0] == 6
    hist = handle._state.history
    assert hist.shape[0] == 6
    assert torch.equal(hist[:, :n], (inputs["input_ids"] == H.IMAGE_ID).repeat_interleave(3, 0))
    for i in range(2):
        alone = model.generate(
            **H.sample_inputs(inputs, i, model), do_sample=False, num_beams=3, num_return_sequences=3, max_new_tokens=3
        )
        assert torch.equal(out[3 * i : 3 * i + 3, -3:], alone[:, -3:])


def _step(model, ids, am, cache):
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=am, **cache_kwargs(cache), use_cache=True)
    return o.logits[:, -1].argmax(-1, keepdim=True), output_cache(o)


def test_two_models_decoded_in_turn_keep_separate_masks():
    """Same weights, different plans and layouts, every decode step of one followed by one of
    the other: each matches its own uninterrupted greedy generation."""
    a, b = H.tiny_llava(seed=0), H.tiny_llava(seed=0)
    ia = H.make_inputs(a, batch=1, images=[2], seed=1)
    ib = H.make_inputs(b, batch=2, images=[1, 2], seed=2)
    ha = apply_skip_plan(a, SkipPlan(**PLAN), backend="torch")
    hb = apply_skip_plan(b, SkipPlan(num_layers=3, frozen_layers=[0, 2], decode_bypass_layers=[1]), backend="torch")
    steps = 4
    solo = [
        m.generate(**i, do_sample=False, max_new_tokens=steps)[:, i["input_ids"].shape[1] :]
        for m, i in ((a, ia), (b, ib))
    ]
    with torch.no_grad():
        oa, ob = a(**ia, use_cache=True), b(**ib, use_cache=True)
    run = {
        "a": [a, oa.logits[:, -1].argmax(-1, keepdim=True), ia["attention_mask"], output_cache(oa), []],
        "b": [b, ob.logits[:, -1].argmax(-1, keepdim=True), ib["attention_mask"], output_cache(ob), []],
    }
    for _ in range(steps):
        for name in ("a", "b"):
            model, tok, am, cache, toks = run[name]
            toks.append(tok)
            if len(toks) == steps:
                continue
            am = torch.cat([am, torch.ones_like(tok)], 1)
            tok, cache = _step(model, tok, am, cache)
            run[name][1:4] = [tok, am, cache]
    assert torch.equal(torch.cat(run["a"][4], 1), solo[0])
    assert torch.equal(torch.cat(run["b"][4], 1), solo[1])
    assert ha._state.history.shape[0] == 1 and hb._state.history.shape[0] == 2
    assert torch.equal(ha._state.history[:, : ia["input_ids"].shape[1]], ia["input_ids"] == H.IMAGE_ID)
    assert torch.equal(hb._state.history[:, : ib["input_ids"].shape[1]], ib["input_ids"] == H.IMAGE_ID)
