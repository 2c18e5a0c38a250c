"""Visual-token pruning (FastV, VTW, PyramidDrop) inside a patched transformers model equals an
independent reference: the model's own eager attention, ranking from layer K-1's attention
probabilities and the dropped tokens masked out as keys of layers >= K (hf_reference.py).
The patched model really runs layers >= K on the compacted sequence: their caches hold only
the kept tokens."""

import pytest
import torch

from python_tests import hf_models as H
from python_tests.hf.generation import assert_same_generation, greedy_steps
from python_tests.hf.hf_reference import plan_hooks
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan, kv_cache_bytes
from vskip_kernels.hf.compat import cache_kwargs, cache_layer_length
from vskip_kernels.plan import PruneStage

pytestmark = pytest.mark.hf

LAYERS = 5
STEPS = 4
ATOL = 1e-4
FASTV = [dict(layer=2, keep=0.5, rank="last")]
COMBINED = dict(vskip_layers=[1, 3], frozen_layers=[4], decode_bypass_layers=[0, 3])
PYRAMID = [dict(layer=1, keep=0.75, rank="mean"), dict(layer=3, keep=0.25, rank="last")]
VTW = [dict(layer=3, keep=0.0)]


def _batch(fam):
    # different visual counts per sequence and extra left padding on the first
    return H.make_inputs(H.FACTORIES[fam](layers=LAYERS), batch=2, images=[2, 1], pad_extra=[3, 0])


def _generate(model, inputs, **kw):
    return greedy_steps(model, inputs, STEPS, **kw)


def _hooks(ref, plan):
    return plan_hooks(
        ref,
        vskip=plan.get("vskip_layers", ()),
        frozen=plan.get("frozen_layers", ()),
        bypass=plan.get("decode_bypass_layers", ()),
        prune=plan.get("prune", ()),
    )


def _reference(fam, inputs, plan, **kw):
    ref = H.FACTORIES[fam](layers=LAYERS)
    with _hooks(ref, plan) as info, torch.no_grad():
        return (*_generate(ref, inputs, **kw)[:2], info["dropped"])


def _patched(fam, inputs, plan, backend="torch", **kw):
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **plan), backend=backend)
    with torch.no_grad():
        return _generate(model, inputs, **kw)


def _assert_same(got, want):
    assert_same_generation(got, want, ATOL)


def _visual_counts(inputs):
    return (inputs["input_ids"] == H.IMAGE_ID).sum(1)


def _kept_lengths(inputs, dropped, layer):
    """Per sequence, the prompt positions layers >= ``layer`` keep (real and not dropped)."""
    gone = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    for k, d in dropped.items():
        if k <= layer:
            gone |= d
    return (inputs["attention_mask"].bool() & ~gone).sum(1)


def _assert_compacted(out, inputs, dropped, first_stage):
    """Layers >= each stage hold the longest kept prompt plus the generated tokens; earlier ones all."""
    cache = out.past_key_values
    n = inputs["input_ids"].shape[1]
    generated = out.sequences.shape[1] - n - 1  # the last token is never fed back
    for layer in range(LAYERS):
        held = cache_layer_length(cache, layer)
        want = n if layer < first_stage else int(_kept_lengths(inputs, dropped, layer).max())
        if layer in COMBINED["decode_bypass_layers"] and held != want + generated:
            continue  # only under COMBINED: a bypassed layer stops at the prompt
        assert held == want + generated, (layer, held, want, generated)


@pytest.mark.parametrize("fam", H.VLM_FAMILIES)
@pytest.mark.parametrize("layers", [{}, COMBINED], ids=["alone", "with_skip_layers"])
def test_fastv_generate_equals_reference(fam, layers):
    plan = dict(layers, prune=FASTV)
    inputs = _batch(fam)
    assert (inputs["attention_mask"] == 0).any()
    *want, dropped = _reference(fam, inputs, plan)
    visual = [int(v) for v in _visual_counts(inputs)]
    assert dropped[2].sum(1).tolist() == [v - round(0.5 * v) for v in visual] and min(visual) > 1
    got_tokens, got_scores, out = _patched(fam, inputs, plan)
    _assert_same((got_tokens, got_scores), want)
    _assert_compacted(out, inputs, dropped, 2)
    # The pruning must matter, or this test could not fail: the reference without it differs.
    _, unpruned, _ = _reference(fam, inputs, layers)
    finite = torch.isfinite(want[1])
    assert (unpruned - want[1])[finite].abs().max() > 100 * ATOL


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("prune", [PYRAMID, VTW], ids=["pyramid_mean", "vtw"])
def test_multi_stage_and_vtw_equal_reference(fam, prune):
    plan = dict(prune=prune, frozen_layers=[2])
    inputs = _batch(fam)
    *want, dropped = _reference(fam, inputs, plan)
    got_tokens, got_scores, out = _patched(fam, inputs, plan)
    _assert_same((got_tokens, got_scores), want)
    _assert_compacted(out, inputs, dropped, prune[0]["layer"])


def test_vtw_at_layer_zero_keeps_positions():
    """keep=0 at layer 0: every layer runs the text only; transformers still numbers positions
    from the full sequence (the cache redirect adds the withdrawn positions back)."""
    plan = dict(prune=[dict(layer=0, keep=0.0)])
    for fam in ("llava", "qwen2_vl"):
        inputs = _batch(fam)
        *want, dropped = _reference(fam, inputs, plan)
        got_tokens, got_scores, out = _patched(fam, inputs, plan)
        _assert_same((got_tokens, got_scores), want)
        _assert_compacted(out, inputs, dropped, 0)


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_forward_logits_of_kept_and_text_positions_equal_reference(fam):
    plan = dict(prune=PYRAMID)
    inputs = _batch(fam)
    ref = H.FACTORIES[fam](layers=LAYERS)
    with _hooks(ref, plan) as info, torch.no_grad():
        want = ref(**inputs).logits
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **plan), backend="torch")
    with torch.no_grad():
        got = model(**inputs).logits
    kept = inputs["attention_mask"].bool()
    for d in info["dropped"].values():
        kept &= ~d
    assert got.shape == want.shape
    torch.testing.assert_close(got[kept], want[kept], rtol=0, atol=ATOL)
    assert (
        got[~kept & inputs["attention_mask"].bool()] - want[~kept & inputs["attention_mask"].bool()]
    ).abs().max() > 0


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_static_cache_equals_reference(fam):
    plan = dict(COMBINED, prune=FASTV)
    inputs = _batch(fam)
    *want, _ = _reference(fam, inputs, plan)
    got = _patched(fam, inputs, plan, cache_implementation="static")
    _assert_same(got[:2], want)


@pytest.mark.parametrize("fam", ["llava", "llava_next"])
def test_beam_search_equals_reference(fam):
    plan = dict(COMBINED, prune=FASTV)
    inputs = _batch(fam)
    kw = dict(num_beams=3, num_return_sequences=2, min_new_tokens=STEPS, max_new_tokens=STEPS, do_sample=False)
    ref = H.FACTORIES[fam](layers=LAYERS)
    with _hooks(ref, plan), torch.no_grad():
        want = ref.generate(**inputs, **kw)
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, **plan), backend="torch")
    with torch.no_grad():
        got = model.generate(**inputs, **kw)
    assert torch.equal(got, want)


def test_remove_restores_identical_generation():
    fam = "llava"
    model = H.FACTORIES[fam](layers=LAYERS)
    inputs = _batch(fam)
    with torch.no_grad():
        before = _generate(model, inputs)[:2]
        handle = apply_skip_plan(model, SkipPlan(num_layers=LAYERS, prune=FASTV), backend="torch")
        _generate(model, inputs)
        handle.remove()
        after = _generate(model, inputs)[:2]
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_kv_cache_bytes_shrink_by_the_dropped_positions():
    fam = "llava"
    inputs = _batch(fam)
    model = H.FACTORIES[fam](layers=LAYERS)
    apply_skip_plan(model, SkipPlan(num_layers=LAYERS, prune=FASTV), backend="torch")
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache), use_cache=True)
    got = kv_cache_bytes(cache)
    n = inputs["input_ids"].shape[1]
    cfg = model.config.get_text_config()
    per_pos = (
        2 * inputs["input_ids"].shape[0] * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    )
    visual = _visual_counts(inputs)
    longest_kept = int(
        (inputs["attention_mask"].sum(1) - (visual - torch.tensor([round(0.5 * v) for v in visual.tolist()]))).max()
    )
    assert got == [n * per_pos] * 2 + [longest_kept * per_pos] * 3


def _triton_matches_torch(dev):
    """The same plan through the Triton kernels (ranking included) gives the torch backend's tokens."""
    plan = SkipPlan(num_layers=LAYERS, **COMBINED, prune=FASTV)
    fam = "qwen2_vl"
    tri, tor = H.FACTORIES[fam](layers=LAYERS).to(dev), H.FACTORIES[fam](layers=LAYERS).to(dev)
    inputs = {k: v.to(dev) for k, v in _batch(fam).items()}
    apply_skip_plan(tri, plan, backend="triton")
    apply_skip_plan(tor, plan, backend="torch")
    with torch.no_grad():
        got, want = _generate(tri, inputs), _generate(tor, inputs)
    _assert_same(got[:2], want[:2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda-marked test below runs the kernels natively")
def test_triton_backend_matches_torch_backend():
    _triton_matches_torch("cpu")  # Triton's interpreter (the suite sets TRITON_INTERPRET=1 without CUDA)


@pytest.mark.cuda
def test_triton_backend_matches_torch_backend_on_cuda():
    _triton_matches_torch("cuda")


def test_continuing_an_unpruned_cache_is_refused():
    fam = "llava"
    inputs = _batch(fam)
    model = H.FACTORIES[fam](layers=LAYERS)
    handle = apply_skip_plan(model, SkipPlan(num_layers=LAYERS), backend="torch")
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache), use_cache=True)
        handle.set_plan(SkipPlan(num_layers=LAYERS, prune=[PruneStage(layer=2, keep=0.5)]))
        nxt = {
            "input_ids": torch.tensor([[5], [6]]),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
        }
        with pytest.raises(ValueError, match="did not prune"):
            model(**nxt, **cache_kwargs(cache), use_cache=True)
