"""The triton backend (Triton's interpreter on CPU) through the HF patch: same logits and
tokens as the torch backend, with one schedule planned per policy per forward."""

import pytest
import torch

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.hf import apply_skip_plan
from vskip_kernels.ops import dispatch

pytestmark = [
    pytest.mark.hf,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or dispatch.interpreter_on()),
        reason="triton backend needs CUDA or TRITON_INTERPRET=1",
    ),
]

PLAN = dict(num_layers=3, vskip_layers=[0], frozen_layers=[1], decode_bypass_layers=[2])


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_triton_backend_matches_torch_backend(fam):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tri, tor = H.FACTORIES[fam]().to(dev), H.FACTORIES[fam]().to(dev)
    inputs = {k: v.to(dev) for k, v in H.make_inputs(tri, batch=2, images=[1, 2]).items()}
    ht = apply_skip_plan(tri, SkipPlan(**PLAN), backend="triton")
    apply_skip_plan(tor, SkipPlan(**PLAN), backend="torch")
    planned = []
    orig = ht._state.schedule_for

    def spy(*a, **k):
        s = orig(*a, **k)
        planned.append(s)
        return s

    ht._state.schedule_for = spy
    with torch.no_grad():
        got, want = tri(**inputs).logits, tor(**inputs).logits
    am = inputs["attention_mask"].bool()
    # fp32 on both sides: only the summation order differs.
    torch.testing.assert_close(got[am], want[am], rtol=0, atol=2e-5)
    assert len(planned) == 3 and all(s is not None for s in planned)
    assert planned[0] is not planned[1]  # vskip and frozen differ; dense layer 2 has its own
    assert {s.policy for s in planned} == {"vskip", "frozen", "dense"}
    g_tri = tri.generate(**inputs, do_sample=False, max_new_tokens=3)
    g_tor = tor.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert torch.equal(g_tri, g_tor)


def test_schedule_shared_by_layers_of_one_policy():
    model = H.tiny_llava()
    handle = apply_skip_plan(model, SkipPlan(num_layers=3, vskip_layers=[0, 1, 2]), backend="triton")
    inputs = H.make_inputs(model, batch=2, images=[2, 1])
    planned = []
    orig = handle._state.schedule_for
    handle._state.schedule_for = lambda *a, **k: planned.append(orig(*a, **k)) or planned[-1]
    with torch.no_grad():
        model(**inputs)
    assert len(planned) == 3 and planned[0] is planned[1] is planned[2]
