"""generate() under a SkipPlan: batching with left padding, decode bypass (dynamic and static
caches), batch expansion for beams / num_return_sequences, chunked prefill, mass recording."""

import pytest
import torch
from transformers import DynamicCache

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan, language_model
from vskip_kernels.hf.compat import cache_kwargs, output_cache

pytestmark = pytest.mark.hf

PLAN = dict(num_layers=3, vskip_layers=[0], frozen_layers=[1], decode_bypass_layers=[2])
STEPS = 4


def gen(model, inputs, **kw):
    kw.setdefault("max_new_tokens", STEPS)
    return model.generate(**inputs, do_sample=False, **kw)[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("fam", H.VLM_FAMILIES)
def test_batched_generate_equals_each_sample_alone(fam):
    model = H.FACTORIES[fam]()
    apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[2, 1], pad_extra=[3, 0])
    assert (inputs["attention_mask"] == 0).any()
    batched = gen(model, inputs)
    for i in range(2):
        alone = gen(model, H.sample_inputs(inputs, i, model))
        assert torch.equal(batched[i : i + 1], alone), (i, batched, alone)


def reference_decode(ref, inputs, bypass, steps=STEPS):
    """Greedy decode by hand: the full model for prefill, then the language model's layers one
    by one, skipping bypassed layers, with explicit eager masks."""
    ref.set_attn_implementation("eager")
    lm = language_model(ref)
    cache = DynamicCache(config=ref.config.get_text_config())
    am = inputs["attention_mask"]
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    with torch.no_grad():
        out = ref(**inputs, **cache_kwargs(cache), use_cache=True, position_ids=pos)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for _ in range(steps - 1):
            am = torch.cat([am, torch.ones_like(tok)], 1)
            p = pos[:, -1:] + 1
            pos = torch.cat([pos, p], 1)
            h = lm.embed_tokens(tok)
            pe = lm.rotary_emb(h, p)
            for i, layer in enumerate(lm.layers):
                if i in bypass:
                    continue
                n_keys = cache.layers[i].keys.shape[2] + 1
                mask = torch.zeros(am.shape[0], 1, 1, n_keys).masked_fill(
                    ~am[:, -n_keys:].bool()[:, None, None], torch.finfo(torch.float32).min
                )
                h = layer(
                    h,
                    attention_mask=mask,
                    position_embeddings=pe,
                    position_ids=p,
                    **cache_kwargs(cache),
                    use_cache=True,
                )
            tok = ref.lm_head(lm.norm(h))[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return torch.cat(toks, 1)


@pytest.mark.parametrize("fam", ["llava", "llama"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_bypass_matches_reference_loop(fam, cache):
    model, ref = H.FACTORIES[fam](), H.FACTORIES[fam]()
    inputs = H.make_inputs(model, batch=2, images=None if fam == "llama" else [1, 2])
    bypass = [0, 2]
    apply_skip_plan(model, SkipPlan(num_layers=3, decode_bypass_layers=bypass), backend="torch")
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    got = gen(model, inputs, **kw)
    want = reference_decode(ref, inputs, bypass)
    assert torch.equal(got, want)
    # Bypass must change the result, otherwise the test could not fail.
    assert not torch.equal(want, reference_decode(ref, inputs, []))


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava_onevision"])
def test_static_cache_equals_dynamic_with_layer0_bypassed(fam):
    model = H.FACTORIES[fam]()
    apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[1], decode_bypass_layers=[0]), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    assert torch.equal(gen(model, inputs, cache_implementation="static"), gen(model, inputs))


def test_beams_and_return_sequences_expand_the_mask():
    model = H.tiny_llava()
    handle = apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[2, 1])
    out = model.generate(**inputs, do_sample=False, num_beams=2, num_return_sequences=2, max_new_tokens=3)
    assert out.shape[0] == 4
    # The history covers the prompt plus the fed tokens, per expanded row.
    hist = handle._state.history
    ids = inputs["input_ids"].repeat_interleave(2, 0)
    assert hist.shape[0] == 4
    assert torch.equal(hist[:, : ids.shape[1]], (ids == H.IMAGE_ID))
    for i in range(2):
        alone = model.generate(
            **H.sample_inputs(inputs, i, model), do_sample=False, num_beams=2, num_return_sequences=2, max_new_tokens=3
        )
        assert torch.equal(out[2 * i : 2 * i + 2, -3:], alone[:, -3:])
    # Beam reordering moves the rows of the visual history with the cache.
    with torch.no_grad():
        o = model(**inputs, use_cache=True)
    before = handle._state.history.clone()
    output_cache(o).reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(handle._state.history, before.flip(0))


def test_expanded_cache_batch_follows():
    """A prompt cached for batch 1, then continued with its cache expanded to 3 rows."""
    model = H.tiny_llava()
    handle = apply_skip_plan(model, SkipPlan(**PLAN), backend="torch")
    inputs = H.make_inputs(model, batch=1)
    with torch.no_grad():
        o = model(**inputs, use_cache=True)
        cache = output_cache(o)
        cache.batch_repeat_interleave(3)
        nxt = o.logits[:, -1:].argmax(-1).repeat(3, 1)
        am = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1).repeat(3, 1)
        step = model(input_ids=nxt, attention_mask=am, **cache_kwargs(cache), use_cache=True)
    assert handle._state.history.shape == (3, am.shape[1])
    assert torch.equal(step.logits[0], step.logits[2])


def test_chunked_prefill_matches_single_prefill():
    model = H.tiny_llava()
    apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0, 2], frozen_layers=[1]), backend="torch")
    inputs = H.make_inputs(model, batch=1, text_len=4)
    ids = inputs["input_ids"]
    n = ids.shape[1]
    extra = torch.randint(*H.TEXT_ID_RANGE, (1, 5), generator=torch.Generator().manual_seed(1))
    full = torch.cat([ids, extra], 1)
    with torch.no_grad():
        whole = model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs["pixel_values"]).logits
        first = model(**inputs, use_cache=True)
        second = model(
            input_ids=extra, attention_mask=torch.ones_like(full), **cache_kwargs(output_cache(first)), use_cache=True
        )
    torch.testing.assert_close(second.logits, whole[:, n:], rtol=0, atol=2e-5)


def test_record_visual_mass_during_generate():
    model = H.tiny_qwen2_vl()
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0], decode_bypass_layers=[1]), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    with handle.record_visual_mass() as rec:
        gen(model, inputs)
    # One prefill plus STEPS - 1 decode forwards; the bypassed layer records prefill only.
    assert [len(rec.per_layer[i]) for i in range(3)] == [STEPS, 1, STEPS]
    for masses in rec.per_layer.values():
        for m in masses:
            assert m.shape == (2, 4) and m.dtype == torch.float32
            assert ((m >= 0) & (m <= 1)).all() and (m > 0).all()
    # Outside the context nothing is recorded.
    gen(model, inputs, max_new_tokens=1)
    assert len(rec.per_layer[0]) == STEPS
