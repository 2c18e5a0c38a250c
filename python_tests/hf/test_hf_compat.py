"""The transformers compat layer: cache keyword by either name, outputs, the tested range and
its warning, and errors that name the release instead of answering wrongly."""

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan, compat

pytestmark = pytest.mark.hf


def test_model_cache_kwarg_is_what_the_installed_models_declare():
    params = inspect.signature(LlamaModel.forward).parameters
    name = compat.model_cache_kwarg()
    assert name in params
    assert compat.cache_param_name(LlamaDecoderLayer.forward) in params


def test_get_cache_reads_either_name_and_refuses_two_caches():
    a, b = DynamicCache(), DynamicCache()
    assert compat.get_cache({"cache": a}) is a
    assert compat.get_cache({"past_key_values": a}) is a
    assert compat.get_cache({"cache": None, "past_key_values": a}) is a
    assert compat.get_cache({"cache": a, "past_key_values": a}) is a
    assert compat.get_cache({}) is None
    with pytest.raises(ValueError, match="two different caches"):
        compat.get_cache({"cache": a, "past_key_values": b})


def test_output_cache_reads_what_the_model_returned():
    model = H.tiny_llama()
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, DynamicCache)
    assert compat.cache_layer_length(cache, 0) == 3
    assert compat.output_cache(None) is None


def test_decode_step_detection():
    cache = DynamicCache()
    h1 = torch.zeros(2, 1, 8)
    assert not compat.is_decode_step(h1, None, 0)
    assert not compat.is_decode_step(h1, cache, 0)  # one-token prefill on an empty cache
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    assert compat.is_decode_step(h1, cache, 0)
    assert not compat.is_decode_step(torch.zeros(2, 2, 8), cache, 0)  # a continuation chunk
    assert not compat.is_decode_step(h1, cache, 1)  # that layer has nothing cached


def _accepted_cache_names():
    """Every keyword the installed release takes a cache under (the new one, plus a deprecated alias)."""
    names = [compat.model_cache_kwarg()]
    if names[0] == "cache":
        names.append("past_key_values")  # kept as a deprecation shim until 5.40
    return names


@pytest.mark.parametrize("name", _accepted_cache_names())
def test_manual_decode_loop_with_each_cache_name_equals_generate(name):
    """Users continue a cache by hand under whichever name their code uses."""
    model = H.tiny_llava(layers=4)
    apply_skip_plan(
        model, SkipPlan(num_layers=4, vskip_layers=[1], frozen_layers=[2], decode_bypass_layers=[0, 3]), backend="torch"
    )
    inputs = H.make_inputs(model, batch=2, images=[2, 1], pad_extra=[2, 0])
    steps = 4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = model.generate(**inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)[
            :, inputs["input_ids"].shape[1] :
        ]
        out = model(**inputs, use_cache=True)
        toks = [out.logits[:, -1:].argmax(-1)]
        am = inputs["attention_mask"]
        for _ in range(steps - 1):
            am = torch.cat([am, torch.ones_like(toks[-1])], 1)
            out = model(input_ids=toks[-1], attention_mask=am, use_cache=True, **{name: compat.output_cache(out)})
            toks.append(out.logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat(toks, 1), want)


def test_tested_range_logic():
    lo, hi = compat.TESTED
    assert compat.in_tested_range(lo)
    assert compat.in_tested_range(hi)
    major, minor, _ = compat._release(hi)
    assert compat.in_tested_range(f"{major}.{minor}.7")  # patch releases of the newest tested minor
    assert not compat.in_tested_range(f"{major}.{minor + 1}.0")
    assert not compat.in_tested_range("4.57.1")
    assert compat.in_tested_range(compat.transformers_version()) == (not compat.warn_if_untested())


def test_warns_once_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "9.1.0")
    compat.warn_if_untested.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                handle = apply_skip_plan(H.tiny_llama(), SkipPlan(num_layers=3), backend="torch")
                handle.remove()
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "9.1.0" in msgs[0] and compat.TESTED[0] in msgs[0]
    finally:
        compat.warn_if_untested.cache_clear()


def test_cache_without_layered_api_is_a_named_error():
    class OldCache:
        layers = []

        def get_seq_length(self, layer_idx=0):
            return 0

    with pytest.raises(compat.TransformersCompatError, match="get_mask_sizes") as e:
        compat.check_cache_methods(OldCache())
    assert compat.transformers_version() in str(e.value)

    class NoLayers:
        pass

    with pytest.raises(compat.TransformersCompatError, match=r"\.layers"):
        compat.cache_layer_length(NoLayers(), 0)


def test_reading_the_output_cache_logs_no_deprecation(monkeypatch):
    """Outputs of 5.24 answer `past_key_values` with a deprecation warning; the patch must not ask."""
    from transformers.utils import logging as hf_logging

    logged = []
    logger = hf_logging.get_logger("transformers.utils.generic")
    monkeypatch.setattr(logger, "warning_once", lambda msg, *a, **k: logged.append(str(msg)))
    monkeypatch.setattr(logger, "warning", lambda msg, *a, **k: logged.append(str(msg)))
    model = H.tiny_llama()
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, decode_bypass_layers=[2]), backend="torch")
    with torch.no_grad():
        for use_cache in (True, False):
            out = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=use_cache)
            assert (compat.output_cache(out) is not None) == use_cache
        model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)
    handle.remove()
    assert not [m for m in logged if "deprecated" in m], logged
