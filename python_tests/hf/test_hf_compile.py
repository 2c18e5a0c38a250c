"""A patched model's decode step traces into one graph (what CUDA-graph decode needs): no host
read of the cache length, no data-dependent branch. Checked with fullgraph=True on CPU, where
any graph break is an error, and the compiled step must equal the eager one."""

import pytest
import torch
from transformers import StaticCache

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan
from vskip_kernels.hf.compat import cache_kwargs

pytestmark = pytest.mark.hf


@pytest.mark.parametrize(
    "plan",
    [
        dict(),
        dict(vskip_layers=[1], frozen_layers=[2], decode_bypass_layers=[0, 3]),
        dict(prune=[{"layer": 2, "keep": 0.5}], vskip_layers=[1], frozen_layers=[3], decode_bypass_layers=[0]),
    ],
    ids=["empty", "vskip+frozen+bypass", "fastv+vskip+frozen+bypass"],
)
def test_decode_step_compiles_fullgraph_and_matches_eager(plan):
    model = H.tiny_llava(layers=4)
    handle = apply_skip_plan(model, SkipPlan(num_layers=4, **plan), backend="torch")
    inputs = H.make_inputs(model, batch=2, images=[1, 2])
    n = inputs["input_ids"].shape[1]

    def prefill():
        cache = StaticCache(config=model.config, max_cache_len=n + 4)
        out = model(**inputs, **cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        return cache, tok, torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            cache, tok, am = prefill()
            eager = model(input_ids=tok, attention_mask=am, **cache_kwargs(cache), use_cache=True).logits
            cache, tok, am = prefill()
            step = torch.compile(model, backend="eager", fullgraph=True)
            compiled = step(input_ids=tok, attention_mask=am, **cache_kwargs(cache), use_cache=True).logits
    finally:
        torch._dynamo.reset()
        handle.remove()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
