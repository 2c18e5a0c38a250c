"""apply_skip_plan on the five VLM families and two text-only decoders: prefill semantics,
reversibility, per-model state, visual-mass recording, the triton backend and loading."""

import pytest
import torch

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan, decoder_layers, language_model, num_decoder_layers, visual_token_ids
from vskip_kernels.hf.compat import cache_kwargs, output_cache
from vskip_kernels.plan import PlanError

pytestmark = pytest.mark.hf

FAMS = H.VLM_FAMILIES
ALL = tuple(H.FACTORIES)
# fp32 everywhere: the only difference from the reference is summation order.
ATOL = 2e-5


def visual_of(input_ids):
    return (input_ids == H.IMAGE_ID) | (input_ids == H.VIDEO_ID)


def policy_mask(is_visual, attention_mask, policy):
    """[B, 1, N, N] additive mask: causal, no padding keys, and V-Skip's visual-visual cut."""
    b, n = is_visual.shape
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= i)[None] & attention_mask.bool()[:, None, :]
    if policy == "vskip":
        vv = is_visual[:, :, None] & is_visual[:, None, :]
        allowed = allowed & ~(vv & (i != j)[None])
    return torch.zeros(b, 1, n, n).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def reference_logits(ref_model, inputs, vskip=(), frozen=()):
    """Eager attention with explicit per-layer 4-D masks; frozen layers get their visual rows
    restored to the layer input."""
    ref_model.set_attn_implementation("eager")
    is_vis = visual_of(inputs["input_ids"])
    am = inputs["attention_mask"]
    hooks = []
    for li, layer in enumerate(decoder_layers(ref_model)):
        mask = policy_mask(is_vis, am, "vskip" if li in vskip else "dense")

        def pre(mod, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        if li in frozen:

            def post(mod, args, kwargs, out):
                x = args[0] if args else kwargs["hidden_states"]
                return torch.where(is_vis[..., None], x, out)

            hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            return ref_model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()


def real(logits, inputs):
    return logits[inputs["attention_mask"].bool()]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def batch_inputs(model, fam):
    return H.make_inputs(model, batch=2, images=None if fam in ("llama", "qwen2") else [1, 2])


@pytest.mark.parametrize("fam", ALL)
def test_empty_plan_matches_unpatched(fam):
    model = H.FACTORIES[fam]()
    inputs = batch_inputs(model, fam)
    before = logits(model, inputs)
    handle = apply_skip_plan(model, SkipPlan(num_layers=num_decoder_layers(model)), backend="torch")
    assert language_model(model).config._attn_implementation == "vskip"
    if hasattr(model.config, "vision_config"):
        assert model.config.vision_config._attn_implementation != "vskip"
    torch.testing.assert_close(real(logits(model, inputs), inputs), real(before, inputs), rtol=0, atol=ATOL)
    handle.remove()


@pytest.mark.parametrize("fam", ALL)
def test_vskip_and_frozen_match_reference(fam):
    model, ref = H.FACTORIES[fam](), H.FACTORIES[fam]()
    inputs = batch_inputs(model, fam)
    plan = SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[1])
    apply_skip_plan(model, plan, backend="torch")
    got = logits(model, inputs)
    want = reference_logits(ref, inputs, vskip=[0], frozen=[1])
    torch.testing.assert_close(real(got, inputs), real(want, inputs), rtol=0, atol=ATOL)
    if fam not in ("llama", "qwen2"):
        # The plan must matter, otherwise this test could not fail.
        dense = reference_logits(ref, inputs)
        assert (real(dense, inputs) - real(want, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_frozen_also_in_first_and_last_layers(fam):
    model, ref = H.FACTORIES[fam](), H.FACTORIES[fam]()
    inputs = batch_inputs(model, fam)
    apply_skip_plan(model, SkipPlan(num_layers=3, frozen_layers=[0, 2], vskip_layers=[1]), backend="torch")
    want = reference_logits(ref, inputs, vskip=[1], frozen=[0, 2])
    torch.testing.assert_close(real(logits(model, inputs), inputs), real(want, inputs), rtol=0, atol=ATOL)


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("mode", ["vskip", "frozen"])
def test_last_layer_only_keeps_next_token_logits(fam, mode):
    model = H.FACTORIES[fam]()
    inputs = batch_inputs(model, fam)
    before = logits(model, inputs)[:, -1]
    plan = SkipPlan(num_layers=3, **{f"{mode}_layers": [2]})
    handle = apply_skip_plan(model, plan, backend="torch")
    got = logits(model, inputs)
    torch.testing.assert_close(got[:, -1], before, rtol=0, atol=ATOL)
    handle.remove()


def test_frozen_layer_skips_visual_rows_for_real():
    """Q/O projections and the FFN of a frozen layer see text rows only."""
    model = H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    layer = decoder_layers(model)[1]
    seen = {}
    for name in ("q_proj", "o_proj", "k_proj"):
        getattr(layer.self_attn, name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).shape[0])
        )
    layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    apply_skip_plan(model, SkipPlan(num_layers=3, frozen_layers=[1]), backend="torch")
    logits(model, inputs)
    am = inputs["attention_mask"].bool()
    n_text = int((am & ~visual_of(inputs["input_ids"])).sum())
    assert seen["q_proj"] == seen["o_proj"] == seen["mlp"] == n_text
    assert seen["k_proj"] == am.numel()


def test_remove_restores_exactly():
    model = H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    before = logits(model, inputs)
    layers_before = list(decoder_layers(model))
    hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    impl_before = language_model(model).config._attn_implementation
    handle = apply_skip_plan(
        model, SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[1], decode_bypass_layers=[2]), backend="torch"
    )
    assert (logits(model, inputs) - before).abs().max() > 1e-3
    handle.remove()
    assert list(decoder_layers(model)) == layers_before
    assert all(a is b for a, b in zip(decoder_layers(model), layers_before))
    assert all("forward" not in layer.__dict__ for layer in layers_before)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert language_model(model).config._attn_implementation == impl_before
    assert torch.equal(logits(model, inputs), before)
    handle.remove()  # idempotent
    apply_skip_plan(model, SkipPlan(num_layers=3)).remove()  # patchable again


def test_patching_twice_is_an_error():
    model = H.tiny_llava()
    handle = apply_skip_plan(model, SkipPlan(num_layers=3))
    with pytest.raises(RuntimeError, match="already patched"):
        apply_skip_plan(model, SkipPlan(num_layers=3))
    with pytest.raises(RuntimeError, match="already patched"):
        apply_skip_plan(language_model(model), SkipPlan(num_layers=3))
    handle.remove()


def test_plan_checked_against_model():
    model = H.tiny_llava()
    with pytest.raises(PlanError, match="4 decoder layers"):
        apply_skip_plan(model, SkipPlan(num_layers=4))
    with pytest.raises(PlanError, match="every decoder layer"):
        apply_skip_plan(model, SkipPlan(num_layers=3, decode_bypass_layers=[0, 1, 2]))
    with pytest.raises(TypeError, match="SkipPlan"):
        apply_skip_plan(model, {"num_layers": 3})
    with pytest.raises(ValueError, match="backend"):
        apply_skip_plan(model, SkipPlan(num_layers=3), backend="cuda")
    assert "forward" not in decoder_layers(model)[0].__dict__


def test_helpers():
    llava, qvl, ov, llama = H.tiny_llava(), H.tiny_qwen2_vl(), H.tiny_llava_onevision(), H.tiny_llama()
    assert visual_token_ids(llava) == [H.IMAGE_ID]
    assert visual_token_ids(qvl) == [H.IMAGE_ID, H.VIDEO_ID]
    assert visual_token_ids(ov) == [H.IMAGE_ID, H.VIDEO_ID]
    assert visual_token_ids(llama) == []
    assert language_model(llava) is llava.model.language_model
    assert language_model(llama) is llama.model
    assert decoder_layers(qvl) is qvl.model.language_model.layers
    assert num_decoder_layers(llava) == 3
    with pytest.raises(TypeError, match="language model"):
        language_model(torch.nn.Linear(2, 2))


def test_set_plan_switches_without_repatching():
    model, ref = H.tiny_llava(), H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    handle = apply_skip_plan(model, SkipPlan(num_layers=3), backend="torch")
    dense = logits(model, inputs)
    handle.set_plan(SkipPlan(num_layers=3, vskip_layers=[1]))
    torch.testing.assert_close(
        real(logits(model, inputs), inputs), real(reference_logits(ref, inputs, vskip=[1]), inputs), rtol=0, atol=ATOL
    )
    handle.set_plan(SkipPlan(num_layers=3, frozen_layers=[0]))
    torch.testing.assert_close(
        real(logits(model, inputs), inputs), real(reference_logits(ref, inputs, frozen=[0]), inputs), rtol=0, atol=ATOL
    )
    handle.set_plan(SkipPlan(num_layers=3))
    assert torch.equal(logits(model, inputs), dense)
    with pytest.raises(PlanError):
        handle.set_plan(SkipPlan(num_layers=2))


def test_two_patched_models_keep_separate_state():
    a, b = H.tiny_llava(seed=0), H.tiny_qwen2_vl(seed=1)
    ia, ib = H.make_inputs(a, batch=1, seed=3), H.make_inputs(b, batch=2, images=[2, 1], seed=4)
    plan = SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[1])
    ha, hb = apply_skip_plan(a, plan, backend="torch"), apply_skip_plan(b, plan, backend="torch")
    solo_a = a.generate(**ia, max_new_tokens=3, do_sample=False)
    solo_b = b.generate(**ib, max_new_tokens=3, do_sample=False)
    # Interleave: prefill a, then b (different batch and layout), then continue a.
    with torch.no_grad():
        out_a = a(**ia, use_cache=True)
        b(**ib, use_cache=True)
        assert ha._state.history.shape == ia["input_ids"].shape
        assert hb._state.history.shape == ib["input_ids"].shape
        nxt = out_a.logits[:, -1].argmax(-1, keepdim=True)
        am = torch.cat([ia["attention_mask"], torch.ones_like(nxt)], 1)
        step = a(input_ids=nxt, attention_mask=am, **cache_kwargs(output_cache(out_a)), use_cache=True)
    assert nxt.item() == solo_a[0, ia["input_ids"].shape[1]].item()
    assert step.logits[:, -1].argmax(-1).item() == solo_a[0, ia["input_ids"].shape[1] + 1].item()
    assert torch.equal(b.generate(**ib, max_new_tokens=3, do_sample=False), solo_b)


def test_exception_mid_forward_leaves_no_stale_mask():
    model = H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0, 1, 2]), backend="torch")
    boom = decoder_layers(model)[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError, match="boom"):
        logits(model, inputs)
    boom.remove()
    st = handle._state
    assert st.history is None and not st.in_call and not st.schedules
    # Running a layer by hand now must not silently reuse the failed call's mask.
    layer = decoder_layers(model)[0]
    lm = language_model(model)
    h = torch.randn(2, inputs["input_ids"].shape[1], 64)
    pos = torch.arange(h.shape[1])[None]
    with pytest.raises(ValueError, match="visual_context"):
        layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
    with handle.visual_context(visual_of(inputs["input_ids"]), inputs["attention_mask"]):
        out = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
    assert out.shape == h.shape and torch.isfinite(out).all()
    # And the model works again.
    ref = H.tiny_llava()
    torch.testing.assert_close(
        real(logits(model, inputs), inputs),
        real(reference_logits(ref, inputs, vskip=[0, 1, 2]), inputs),
        rtol=0,
        atol=ATOL,
    )


def test_inputs_embeds_needs_visual_context():
    model, ref = H.tiny_llava(), H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[2]), backend="torch")
    lm = language_model(model)
    with torch.no_grad():
        embeds = ref.model(**inputs, output_hidden_states=True).hidden_states[0]  # image features merged in
    with pytest.raises(ValueError, match="visual_context"):
        model.model(**inputs)  # an inner module is not where the patch reads input_ids
    with pytest.raises(ValueError, match="visual_context"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    with handle.visual_context(visual_of(inputs["input_ids"])), torch.no_grad():
        got = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    want = reference_logits(ref, inputs, vskip=[0], frozen=[2])
    torch.testing.assert_close(real(got, inputs), real(want, inputs), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="is_visual"), handle.visual_context(torch.zeros(2, 3)):
        pass
    assert lm is language_model(model)


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_record_visual_mass_matches_eager_attention(fam):
    model, ref = H.FACTORIES[fam](), H.FACTORIES[fam]()
    inputs = batch_inputs(model, fam)
    handle = apply_skip_plan(model, SkipPlan(num_layers=3), backend="torch")
    with handle.record_visual_mass() as rec, torch.no_grad():
        model(**inputs)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref(**inputs, output_attentions=True).attentions
    vis = visual_of(inputs["input_ids"])
    assert sorted(rec.per_layer) == [0, 1, 2]
    for li in range(3):
        (got,) = rec.per_layer[li]
        want = (att[li][:, :, -1, :] * vis[:, None, :]).sum(-1)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert got.min() > 0


def test_record_visual_mass_frozen_and_vskip_policies():
    model, ref = H.tiny_llava(), H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[1]), backend="torch")
    with handle.record_visual_mass() as rec, torch.no_grad():
        model(**inputs)
    # The newest query is text: every policy lets it attend everywhere, so the mass equals the
    # eager attention of the reference run under the same plan.
    caught = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, o[1]))
        for i, layer in enumerate(decoder_layers(ref))
    ]
    reference_logits(ref, inputs, vskip=[0], frozen=[1])
    for h in hooks:
        h.remove()
    vis = visual_of(inputs["input_ids"])
    for li in range(3):
        want = (caught[li][:, :, -1, :] * vis[:, None, :]).sum(-1)
        torch.testing.assert_close(rec.per_layer[li][0], want, rtol=0, atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    model = H.tiny_llava()
    inputs = batch_inputs(model, "llava")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    plan = SkipPlan(num_layers=3, vskip_layers=[0], frozen_layers=[1], decode_bypass_layers=[2])
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    apply_skip_plan(model, plan, backend="torch")
    apply_skip_plan(loaded, SkipPlan.load(plan_path), backend="torch")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)
    assert torch.equal(
        loaded.generate(**inputs, max_new_tokens=3, do_sample=False),
        model.generate(**inputs, max_new_tokens=3, do_sample=False),
    )
