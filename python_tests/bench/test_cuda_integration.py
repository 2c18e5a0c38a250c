"""CUDA-only paths above the kernels: the benchmark baselines (compiled FlexAttention,
SDPA's flash backend, flash-attn when installed) against the reference, and decode of a
patched Hugging Face model under CUDA graphs (static cache + torch.compile
reduce-overhead, as the model benchmark runs it) against eager decode.

cuda-marked: skipped without a GPU, run by ``pytest python_tests -m cuda`` and
``bench/gpu_check.sh``.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from python_tests._shared import assert_rule, build_layout
from vskip_kernels import SkipPlan
from vskip_kernels.bench import baselines
from vskip_kernels.bench import model as bm
from vskip_kernels.bench.model_configs import SMOKE_MODEL_CASES, build_model, input_ids_for, text_config
from vskip_kernels.hf import apply_skip_plan
from vskip_kernels.reference import attention_ref, token_kind

pytestmark = pytest.mark.cuda

POLICIES = ("dense", "vskip", "frozen")


def _inputs(n=1024, hq=8, hkv=2, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g).to(dtype).cuda()
    k = torch.randn(1, hkv, n, d, generator=g).to(dtype).cuda()
    v = torch.randn(1, hkv, n, d, generator=g).to(dtype).cuda()
    vis, _ = build_layout(n, [(35, n - 200), (n - 150, n - 40)])
    return q, k, v, vis.cuda()


def _close_to_reference(name, got, q, k, v, vis, policy, slack=2.0):
    """Within ``slack`` x the bf16 reference's own error (plus 1e-3): a wrong mask is off by ~0.1."""
    ref32 = attention_ref(q, k, v, vis, policy=policy)[0].float()
    reflp = attention_ref(q, k, v, vis, policy=policy, upcast=False)[0].float()
    err = (got.float() - ref32).abs().max().item()
    lim = slack * (reflp - ref32).abs().max().item() + 1e-3
    assert err <= lim, f"{name}: max error {err:.3g} > {lim:.3g}"


@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_flex_attention_baseline(policy):
    q, k, v, vis = _inputs()
    fn, name = baselines.flex(q, k, v, token_kind(vis), policy, compiled=True)
    assert name == "flex_attention"
    _close_to_reference(name, fn(), q, k, v, vis, policy)


def test_sdpa_baselines():
    q, k, v, vis = _inputs()
    _close_to_reference("sdpa flash", baselines.sdpa_flash(q, k, v)(), q, k, v, vis, "dense")
    _close_to_reference("sdpa causal", baselines.sdpa(q, k, v)(), q, k, v, vis, "dense")
    for policy in ("vskip", "frozen"):
        got = baselines.sdpa(q, k, v, baselines.bool_mask(vis, q.shape[2], policy))()
        # rows with no allowed key (frozen visual queries) come out of SDPA as NaN; the contract says 0
        _close_to_reference(f"sdpa {policy}", torch.nan_to_num(got, nan=0.0), q, k, v, vis, policy)


def test_flash_attn_baseline_when_installed():
    mods, reason = baselines.flash_attn_module()
    if mods is None:
        pytest.skip(reason)
    q, k, v, vis = _inputs()
    _close_to_reference("flash-attn-2", baselines.flash_attn_dense(q, k, v)().transpose(1, 2), q, k, v, vis, "dense")
    dq = q[:, :, -1:].contiguous()
    got = baselines.flash_attn_decode(dq, k, v)().transpose(1, 2)
    ref = attention_ref(dq, k, v, vis, policy="dense")[0]
    assert_rule("flash-attn decode", got, ref, attention_ref(dq, k, v, vis, policy="dense", upcast=False)[0], atol=1e-3)


def _plans(num_layers):
    return {
        name: plan
        for name, plan, _ in bm.method_plans(num_layers, smoke=True)
        if name.startswith(("dense (vskip", "flashvlm", "shortv N=2 + vskip"))
    }


@pytest.mark.parametrize(
    "method",
    ["dense (vskip_kernels attention, empty plan)", "flashvlm r=0.2", "shortv N=2 + vskip in the other 2 layers"],
)
def test_cuda_graph_decode_of_patched_model(method):
    """The model benchmark's decode path on the GPU: a static cache and compiled
    (reduce-overhead, CUDA graphs) decode steps, with our attention and skip plan applied,
    give the tokens of eager decode with a dynamic cache, and replay again identically."""
    torch._dynamo.reset()
    dev = torch.device("cuda")
    case = SMOKE_MODEL_CASES[0]
    model = build_model(case, dev, torch.float32)
    ids = input_ids_for(model, case, dev)
    plan = _plans(text_config(model).num_hidden_layers)[method]
    assert isinstance(plan, SkipPlan)
    handle = apply_skip_plan(model, plan)
    try:
        eager = bm._generate(model, ids, 8)
        args = argparse.Namespace(max_new_tokens=8, model_repeats=1)
        fields, mode, fallback = bm.time_method(model, ids, args, dev, graphs=True)
        assert fallback is None, fallback
        assert mode.startswith("static cache + torch.compile"), mode
        assert fields["avg_output_len"] == 8
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=int(ids.shape[1]) + 8)
        first = bm._generate(model, ids, 8, cache)
        again = bm._generate(model, ids, 8, cache)
        assert torch.equal(first, eager), (first, eager)
        assert torch.equal(again, first)
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_patched_decode_step_has_no_graph_break():
    """CUDA graphs pay off only when a decode step is one graph: a patched model's decode
    step compiles without graph breaks (host syncs such as ``.item()`` on a static cache's
    length, or data-dependent branches), like the unpatched SDPA model's."""
    dev = torch.device("cuda")
    case = SMOKE_MODEL_CASES[0]
    model = build_model(case, dev, torch.float32)
    ids = input_ids_for(model, case, dev)
    args = argparse.Namespace(max_new_tokens=4, model_repeats=1)
    plans = _plans(text_config(model).num_hidden_layers)
    for name in (None, "dense (vskip_kernels attention, empty plan)", "flashvlm r=0.2"):
        torch._dynamo.reset()
        handle = apply_skip_plan(model, plans[name]) if name else None
        try:
            fields, mode, fallback = bm.time_method(model, ids, args, dev, graphs=True)
        finally:
            if handle is not None:
                handle.remove()
            torch._dynamo.reset()
        assert fallback is None, (name, fallback)
        assert fields["decode_graph_breaks"] == 0, (
            name or "sdpa",
            fields["decode_graph_count"],
            fields["decode_graph_breaks"],
        )


def test_benchmark_timing_on_cuda():
    """The suites' CUDA timing: one event pair per call (the optional L2 flush outside it),
    and peak memory from the allocator, inputs included."""
    from vskip_kernels.bench.common import peak_memory, time_fn

    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    fn = lambda: a @ a
    for flush in (False, True):
        t = time_fn(fn, dev, warmup=2, repeats=5, flush_l2=flush)
        assert len(t.samples) == 5 and 0 < t.ms_p20 <= t.ms_median <= t.ms_p80
    peak = peak_memory(fn, dev)
    assert peak >= 2 * a.numel() * a.element_size()  # the input and the product
