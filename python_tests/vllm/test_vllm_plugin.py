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
    pruned = {"format": "vskip-plan/1", "num_layers": 4, "prune": [{"layer": 2, "keep": 0.5}]}
    _bad(llava, pruned, r"prune stages \(layers \[2\]\), which the vLLM backend does not run")
    with pytest.raises(PlanError, match="unknown vskip option"):
        H.make_llm(llava, None, additional_config={"vskip_plam": "plan.json"})


def test_plan_given_as_dict_is_applied(llava, monkeypatch):
    """Also: vLLM's CPU attention kernels never run for a plan's layers (they would raise here),
    and the CPU platform's default block size (128) is split into the kernels' 64-token blocks."""
    from vllm import _custom_ops as ops

    def never(*args, **kwargs):
        raise AssertionError("vLLM's CPU attention kernels ran with a vskip plan")

    for name in ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache", "cpu_attn_get_scheduler_metadata"):
        monkeypatch.setattr(ops, name, never)
    plan = {"format": "vskip-plan/1", "num_layers": 4, "vskip_layers": [1]}
    llm = H.make_llm(llava, None, additional_config={"vskip_plan": json.loads(json.dumps(plan))}, block_size=128)
    try:
        impl, counts = H.plan_state(llm)
        assert impl == "VskipAttentionImpl"

        def cache_shape(worker):
            layers = worker.model_runner.get_model().language_model.model.layers
            return tuple(layers[0].self_attn.attn.kv_cache.shape)

        assert llm.collective_rpc(cache_shape)[0][2] == 64  # [kernel blocks, Hkv, 64, 2 * D]
        H.generate(llm, H.prompts("llava", 2, seed=4), n=3)
        assert H.plan_state(llm)[1]["prefill"] >= 1
        kernel, calls = H.kernel_state(llm)
        assert kernel == "torch" and calls["torch"] > 0 and calls["triton"] == 0
    finally:
        H.close(llm)


def test_backend_option_is_checked_at_start_up(llava, tmp_path, monkeypatch):
    plan = H.plan_file(tmp_path, "V", "llava", vskip_layers=[1])
    with pytest.raises(PlanError, match=r"vskip_backend.*one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        H.make_llm(llava, plan, backend="cuda")
    with pytest.raises(PlanError, match=r"vskip_backend.*got 'fast'"):
        H.make_llm(llava, None, backend="fast")  # checked without a plan too
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PlanError, match=r'vskip_backend"\] = "triton" on vLLM\'s CPU platform.*TRITON_INTERPRET=1'):
        H.make_llm(llava, plan, backend="triton")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(PlanError, match="V1 model runner"):
        H.make_llm(llava, plan)


def test_backend_classes_as_vllms_selector_sees_them(monkeypatch):
    """The backend as vLLM's CUDA platform selects it (CudaPlatform.get_attn_backend_cls, which
    imports on the CPU build once its native module is stubbed), its cache layout and graph support."""
    import sys
    import types

    import torch
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from vskip_kernels.vllm import compat
    from vskip_kernels.vllm.backend import VskipAttentionBackend as B

    assert AttentionBackendEnum[B.get_name()] is AttentionBackendEnum.CUSTOM
    assert B.get_builder_cls().get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert B.supported_kv_cache_layouts()[0] == KVCacheLayout.LBHNC
    assert not B.forward_includes_kv_cache_update
    cap = DeviceCapability(9, 0)

    def reasons(**kw):
        base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
        return B.validate_configuration(device_capability=cap, **AttentionSelectorConfig(**{**base, **kw})._asdict())

    assert reasons() == [] and reasons(dtype=torch.float32, block_size=128) == []
    assert reasons(head_size=8) == ["head_size not supported"]
    assert reasons(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert reasons(block_size=8) == ["block_size not supported"]
    assert reasons(has_sliding_window=True, has_sink=True) == [
        "attention sinks not supported",
        "sliding window not supported",
    ]
    assert reasons(attn_type="encoder_only") == ["attention type encoder_only not supported"]

    had_cuda_module = "vllm.platforms.cuda" in sys.modules
    monkeypatch.setitem(sys.modules, "vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    from vllm.platforms.cuda import CudaPlatform

    monkeypatch.setattr(CudaPlatform, "get_device_capability", classmethod(lambda cls, device_id=0: cap))
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(AttentionBackendEnum.CUSTOM, compat.BACKEND_PATH)
    try:
        cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float16, kv_cache_dtype="auto", block_size=None)
        assert CudaPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == compat.BACKEND_PATH
        bad = cfg._replace(kv_cache_dtype="fp8")
        with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
            CudaPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, bad)
    finally:
        AttentionBackendEnum.CUSTOM.clear_override()
        if not had_cuda_module:  # the rest of the session stays on a CPU-only module set
            sys.modules.pop("vllm.platforms.cuda", None)


def test_cuda_start_up_path(llava, tmp_path, monkeypatch):
    """The start-up hook as on CUDA (the platform check faked; the config is still the CPU
    build's): CUSTOM points at the backend and is the engine's attention backend, the kernel
    resolves to Triton, the V1 model runner is used, and another explicit backend is refused."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vskip_kernels.vllm import compat

    monkeypatch.setattr(compat, "platform_kind", lambda: "cuda")
    plan = H.plan_file(tmp_path, "V", "llava", vskip_layers=[1])
    custom = AttentionBackendEnum.CUSTOM
    try:
        args = EngineArgs(model=llava, dtype="float32", additional_config={"vskip_plan": plan})
        cfg = args.create_engine_config()
        assert cfg.attention_config.backend is custom and custom.get_path() == compat.BACKEND_PATH
        assert args.attention_backend is None  # the EngineArgs are left as given
        assert compat.kernel_of(cfg) == "triton"
        assert compat._wrap_use_v2_model_runner(lambda self: True)(cfg) is False
        assert compat._wrap_use_v2_model_runner(lambda self: True)(EngineArgs(model=llava)) is True
        other = EngineArgs(model=llava, attention_backend="FLASH_ATTN", additional_config={"vskip_plan": plan})
        with pytest.raises(PlanError, match="'FLASH_ATTN': drop that option"):
            other.create_engine_config()
    finally:
        custom.clear_override()


def test_cuda_graph_decision():
    """vskip attention and KV writes must stay out of captured graphs: with vLLM's default
    splitting ops they are graph breaks; a compilation that would capture them runs eagerly."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from vskip_kernels.vllm import compat

    def cfg(graphs=CUDAGraphMode.FULL_AND_PIECEWISE, **kw):
        cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=graphs, **kw)
        cc.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
        return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=False), compilation_config=cc)

    assert compat.graphs_unsafe_reason(cfg()) is None  # 0.32's defaults: attention + KV update split
    assert compat.graphs_unsafe_reason(cfg(CUDAGraphMode.PIECEWISE)) is None
    assert "attention" in str(compat.graphs_unsafe_reason(cfg(splitting_ops=[])))  # (vLLM: FULL graphs)
    only_attention = cfg(splitting_ops=list(CompilationConfig._attention_ops))
    assert "KV-cache update" in str(compat.graphs_unsafe_reason(only_attention))
    none = cfg()
    none.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
    assert compat.graphs_unsafe_reason(none) is None


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
