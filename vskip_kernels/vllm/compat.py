"""Everything that touches vLLM's internals, in one place (tested with vLLM 0.32's CPU build).

The attention backend (``backend.py``: backend, metadata, builder, impl, KV layout) is the same
on vLLM's CPU and CUDA platforms; only its registration differs:

* **CPU**: the platform returns ``AttentionBackendEnum.CPU_ATTN`` whatever the user asks for,
  so that entry is pointed at our backend (the registry lets a plugin override an entry).
* **CUDA**: ``AttentionBackendEnum.CUSTOM`` is pointed at our backend and the engine's
  attention backend is set to ``CUSTOM`` at start-up (an explicit other backend is a
  ``PlanError``); the CUDA platform's selector then checks it with
  ``validate_configuration`` (head size, dtype, KV-cache dtype, block size, attention type).
  Engines with a plan run on vLLM's V1 model runner (``VllmConfig.use_v2_model_runner`` is
  False for them: 0.32 defaults to the V2 runner on CUDA, the hooks below patch the V1 one).

Hooks installed by ``install()`` (idempotent; each does nothing unless the engine's
``additional_config`` names a non-empty plan, so without a plan vLLM runs untouched):

* ``EngineArgs.create_engine_config``: reads and validates the plan and
  ``additional_config["vskip_backend"]`` at start-up, in the front-end process (a bad plan or
  option fails ``LLM(...)`` / ``vllm serve`` before any request), selects the backend on CUDA,
  decides what runs eagerly (below) and logs it in one line.
* the model runners' ``load_model``: registers the backend before the model is built, and,
  after loading, attaches a ``ModelState`` (plan, paged kernel) to the decoder layers'
  attention modules and wraps frozen/bypassed layers.
* the model runners' ``_model_forward`` (called inside vLLM's forward context, outside any
  compiled or captured graph): computes the step's token kinds and decode rows, writes the
  kinds through ``slot_mapping``.
* ``EngineCore.__init__``: with decode-bypass layers, blocks holding generated tokens get
  per-request prefix-cache hashes, so they are never served to another request (a bypassed
  layer writes no usable K/V for generated tokens; a multi-turn prompt that repeats an
  answer must be prefilled in every layer).

Compilation and CUDA graphs. Per-step state (token kinds per slot, decode rows, the step
kind) is never a Python value inside a compiled or captured graph:

* **vskip-only plans** keep vLLM's compilation and piecewise CUDA graphs. The policy changes
  only the attention op, and vLLM 0.32 makes ``vllm::unified_attention_with_output`` and
  ``vllm::unified_kv_cache_update`` splitting ops (``CompilationConfig._attention_ops``, and
  ``set_splitting_ops_for_v1`` when ``splitting_ops`` is None without Inductor graph
  partition), so our impl and K/V writes run eagerly between graph pieces, reading the
  per-slot kinds tensor (updated in place before the forward) at run time. The graph pieces
  (projections, norms, FFN) do not depend on the step kind. On CPU the platform compiles with
  Dynamo only (no graphs); the attention custom op is opaque and runs at run time.
* **Full CUDA graphs** (``FULL``, ``FULL_DECODE_ONLY``, the decode half of 0.32's default
  ``FULL_AND_PIECEWISE``) would capture the attention op itself with one step's lengths and
  kinds. The builder declares ``AttentionCGSupport.NEVER``, so vLLM resolves
  ``FULL_AND_PIECEWISE`` to ``PIECEWISE`` and never captures our attention in a full graph
  (an explicit ``FULL`` for mixed batches is refused by vLLM itself).
* **Frozen and decode-bypass plans** run the engine eagerly (``enforce_eager``): their branch
  (whole layer skipped on a pure decode step, decode rows kept in a mixed step, layer run) is
  Python in the layer wrapper, and a graph would freeze the branch of the step it was
  captured on for every later step of the same shape.
* A configuration that would put the attention op or the K/V write inside a captured graph
  (attention or the KV-cache update not among the splitting ops, e.g. Inductor graph
  partition or attention+quant fusion; breakable CUDA graphs) runs eagerly instead.

The start-up log line says which of these applies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys

from ..plan import PlanError, SkipPlan
from . import config as vcfg

logger = logging.getLogger("vskip_kernels.vllm")

TESTED_VLLM = ("0.32",)
_INSTALLED = False
_SALT_NEXT_ENGINE = [False]


# ----------------------------------------------------------------------------- versions, classes
def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def attention_base_classes():
    """vLLM's abstract attention classes the backend subclasses, and the CUDA-graph support enum:
    (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionCGSupport)."""
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadataBuilder,
    )

    return AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionCGSupport


def kv_cache_layouts():
    """Physical KV-cache layouts the backend takes, preferred first (vLLM's logical page is
    [block, head, token, K|V]; the kernels address it through strides, the content axis last)."""
    from vllm.v1.kv_cache_interface import KVCacheLayout

    return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)


def decoder_attn_types():
    from vllm.v1.attention.backend import AttentionType

    return (AttentionType.DECODER,)


BACKEND_PATH = "vskip_kernels.vllm.backend.VskipAttentionBackend"


def platform_kind() -> str:
    """The platform: "cpu" or "cuda" (the two the backend supports), else its device name."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return str(getattr(current_platform, "device_name", None) or type(current_platform).__name__)


def _clear_selector_cache() -> None:
    from vllm.v1.attention import selector

    fn = getattr(selector, "_cached_get_attn_backend", None)
    if fn is not None and hasattr(fn, "cache_clear"):
        fn.cache_clear()


def _backend_member(kind: str):
    """The backend enum member pointed at the vskip backend: CPU_ATTN on CPU (vLLM's CPU platform
    returns that entry whatever the user asks for), CUSTOM on CUDA (selected through the
    attention config, see ``_select_custom_backend``)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CPU_ATTN if kind == "cpu" else AttentionBackendEnum.CUSTOM


def use_backend(on: bool) -> None:
    """Point the platform's backend entry at the vskip backend (or take our override back)."""
    from vllm.v1.attention.backends.registry import register_backend

    kind = platform_kind()
    if kind not in ("cpu", "cuda"):
        if on:
            raise PlanError(f"the vskip vLLM backend runs on vLLM's CPU and CUDA platforms, not on {kind}")
        return
    member = _backend_member(kind)
    if on:
        register_backend(member, BACKEND_PATH)
    elif member.is_overridden() and member.get_path() == BACKEND_PATH:
        member.clear_override()
    _clear_selector_cache()


def _select_custom_backend(engine_args) -> tuple:
    """CUDA: make vLLM's selector pick AttentionBackendEnum.CUSTOM (ours) for the decoder layers,
    through the engine's attention backend; returns what to restore on the EngineArgs."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    cfg_backend = getattr(engine_args, "attention_config", None)
    cfg_backend = cfg_backend.get("backend") if isinstance(cfg_backend, dict) else getattr(cfg_backend, "backend", None)
    for given in (getattr(engine_args, "attention_backend", None), cfg_backend):
        if given is None or (isinstance(given, str) and given.lower() == "auto"):
            continue
        name = given if isinstance(given, str) else getattr(given, "name", str(given))
        if name.upper() != custom.name:
            raise PlanError(
                f'a vskip plan runs its own attention backend (vLLM\'s "CUSTOM" entry); the engine also asks for '
                f"attention backend {name!r}: drop that option"
            )
    old = engine_args.attention_backend
    if cfg_backend is None:
        engine_args.attention_backend = custom
    return (old,)


def interpreter_on() -> bool:
    from ..ops.dispatch import interpreter_on as on

    return on()


def kernel_of(vllm_config) -> str:
    """The paged kernel ("torch" or "triton") of an engine's config, resolved for this process's platform."""
    choice = vcfg.kernel_choice(getattr(vllm_config, "additional_config", None))
    return vcfg.resolve_kernel(choice, platform_kind() == "cuda", interpreter_on())


# ----------------------------------------------------------------------------- model structure
_O_PROJ_SPLIT = ("LlamaAttention", "Qwen2Attention")


def attention_text_rows(attn, positions, hidden_states, text):
    """``attn(positions, hidden_states)`` (a vLLM Llama/Qwen2 attention block) for the rows
    ``text`` only: Q/K/V and the attention op run on every row (K/V must be written; vLLM fuses
    the Q/K/V projection), the O projection on the text rows only. Other attention classes run
    whole and are sliced."""
    if (
        type(attn).__name__ in _O_PROJ_SPLIT
        and not getattr(attn, "qk_norm", False)
        and all(hasattr(attn, a) for a in ("qkv_proj", "q_size", "kv_size", "rotary_emb", "attn", "o_proj"))
    ):
        qkv, _ = attn.qkv_proj(hidden_states)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        out = attn.attn(q, k, v)
        o, _ = attn.o_proj(out.index_select(0, text))
        return o
    return attn(positions=positions, hidden_states=hidden_states).index_select(0, text)


# ----------------------------------------------------------------------------- plan per config
def plan_of(vllm_config) -> SkipPlan | None:
    """The plan of an engine's config (re-read each time: called a few times per engine start)."""
    return vcfg.plan_from_additional_config(getattr(vllm_config, "additional_config", None))


def needs_eager(plan: SkipPlan) -> bool:
    return bool(plan.frozen_layers or plan.decode_bypass_layers)


def graphs_unsafe_reason(vllm_config) -> str | None:
    """Why the vskip attention or KV write could end up inside a captured CUDA graph under this
    config, or None when they run eagerly (between piecewise graphs, or no graphs at all)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    if vllm_config.model_config.enforce_eager:
        return None
    cc = vllm_config.compilation_config
    if cc.cudagraph_mode is None or cc.cudagraph_mode == CUDAGraphMode.NONE:
        return None
    try:
        from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled

        if is_breakable_cudagraph_enabled():
            return "breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH) capture the KV-cache update"
    except ImportError:  # a release without breakable graphs
        pass
    if cc.mode != CompilationMode.VLLM_COMPILE:
        # no piecewise split: only full graphs could be captured, and the builder's
        # AttentionCGSupport.NEVER makes vLLM drop them (or refuse FULL for mixed batches)
        return None
    if not cc.splitting_ops_contain_attention():
        return "attention is not one of the compilation's splitting_ops"
    if not cc.splitting_ops_contain_kv_cache_update():
        return "the KV-cache update is not one of the compilation's splitting_ops"
    return None


def _check_model_runner() -> None:
    import vllm.envs as envs

    if getattr(envs, "VLLM_USE_V2_MODEL_RUNNER", None):
        raise PlanError(
            "a vskip plan runs on vLLM's V1 model runner (its hooks live there); unset VLLM_USE_V2_MODEL_RUNNER"
        )


# ----------------------------------------------------------------------------- hooks
def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        additional = getattr(self, "additional_config", None)
        plan = vcfg.plan_from_additional_config(additional)
        choice = vcfg.kernel_choice(additional)  # checked even without a plan
        if plan is None:
            return orig(self, *args, **kwargs)
        kind = platform_kind()
        if kind not in ("cpu", "cuda"):
            raise PlanError(f"the vskip vLLM backend runs on vLLM's CPU and CUDA platforms, not on {kind}")
        kernel = vcfg.resolve_kernel(choice, kind == "cuda", interpreter_on())
        _check_model_runner()
        eager = None
        if needs_eager(plan) and not getattr(self, "enforce_eager", False):
            eager = "the plan freezes or bypasses layers (their branch depends on the step kind)"
            self.enforce_eager = True
        restore = None
        if kind == "cuda":
            use_backend(True)
            restore = _select_custom_backend(self)
        try:
            cfg = orig(self, *args, **kwargs)
            why = graphs_unsafe_reason(cfg) if kind == "cuda" else None
            if why is not None:
                eager, self.enforce_eager = why, True
                cfg = orig(self, *args, **kwargs)
        finally:
            if restore is not None:
                self.attention_backend = restore[0]
        mc = cfg.model_config
        vcfg.check_plan_for_model(plan, mc.hf_config, str(mc.model))
        if str(mc.dtype).replace("torch.", "") not in ("float32", "float16", "bfloat16"):
            raise PlanError(f"the vskip backend runs float32/float16/bfloat16 models, got {mc.dtype}")
        if getattr(cfg.cache_config, "cache_dtype", "auto") != "auto":
            raise PlanError(
                f"the vskip backend stores K/V in the model dtype; kv_cache_dtype="
                f"{cfg.cache_config.cache_dtype!r} is not supported with a plan"
            )
        if eager is not None:
            graphs = f"engine runs eagerly: {eager}"
        elif mc.enforce_eager:
            graphs = "engine runs eagerly (enforce_eager)"
        elif kind == "cuda":
            graphs = "attention and KV writes run eagerly between vLLM's piecewise CUDA graphs, no full graphs"
        else:
            graphs = "compiled; attention runs as an opaque op outside the graph"
        logger.info("vskip: %s paged kernel on %s; %s", kernel, kind.upper(), graphs)
        return cfg

    create_engine_config._vskip_wrapped = True
    return create_engine_config


def _has_plan(vllm_config) -> bool:
    additional = getattr(vllm_config, "additional_config", None)
    if not additional or not isinstance(additional, dict) or additional.get(vcfg.PLAN_KEY) is None:
        return False
    try:
        return plan_of(vllm_config) is not None
    except PlanError:  # reported by the create_engine_config hook
        return False


def _wrap_use_v2_model_runner(fget):
    """``VllmConfig.use_v2_model_runner``: False for an engine with a plan (the hooks patch the
    V1 model runners; vLLM 0.32 defaults to the V2 runner on CUDA)."""

    @functools.wraps(fget)
    def use_v2_model_runner(self):
        if _has_plan(self):
            return False
        return fget(self)

    use_v2_model_runner._vskip_wrapped = True
    return use_v2_model_runner


def _decoder_layers(model):
    """The language model's decoder layers of a vLLM model (VLMs keep it at .language_model)."""
    for path in (("language_model", "model"), ("model",), ("language_model",)):
        m = model
        for name in path:
            m = getattr(m, name, None)
            if m is None:
                break
        layers = getattr(m, "layers", None) if m is not None else None
        if layers is not None and len(layers) > 0:
            return layers
    raise PlanError(
        f"cannot find the decoder layers of {type(model).__name__} (expected .language_model.model.layers "
        "or .model.layers)"
    )


def _attention_module(layer, idx):
    attn = getattr(getattr(layer, "self_attn", None), "attn", None)
    if attn is None or not hasattr(attn, "layer_name"):
        raise PlanError(f"decoder layer {idx} ({type(layer).__name__}) has no self_attn.attn Attention module")
    return attn


def attach(runner, plan: SkipPlan) -> None:
    """After load_model: state on the attention modules, wrappers on frozen/bypassed layers."""
    from .layers import LayerWrapper, check_frozen_capable
    from .state import ModelState

    model = runner.get_model()
    layers = _decoder_layers(model)
    hf_config = runner.vllm_config.model_config.hf_config
    vcfg.check_plan_for_model(plan, hf_config)
    if len(layers) != plan.num_layers:
        raise PlanError(
            f'additional_config["vskip_plan"]: plan has {plan.num_layers} layers, the loaded model {len(layers)}'
        )
    names = {}
    for i, layer in enumerate(layers):
        attn = _attention_module(layer, i)
        names[i] = attn.layer_name
        impl = getattr(attn, "impl", None)
        if type(impl).__name__ != "VskipAttentionImpl":
            raise PlanError(
                f"layer {i} got attention impl {type(impl).__name__}, not the vskip backend; another "
                "plugin or an explicit attention backend is overriding it"
            )
    state = ModelState(plan, vcfg.visual_token_ids(hf_config), names, kernel_of(runner.vllm_config))
    for i, layer in enumerate(layers):
        attn = _attention_module(layer, i)
        attn._vskip_state = state
        attn._vskip_policy = state.policies[i]
        attn._vskip_bypass = i in state.bypass
        if state.policies[i] == "frozen" or i in state.bypass:
            if state.policies[i] == "frozen":
                check_frozen_capable(layer, i)
            orig = layer.forward
            layer.forward = LayerWrapper(layer, i, state, orig, attention_text_rows)
    runner._vskip_state = state
    logger.info(
        "vskip: plan applied (vskip %s, frozen %s, decode bypass %s; %s paged kernel)",
        plan.vskip_layers,
        plan.frozen_layers,
        plan.decode_bypass_layers,
        state.kernel,
    )


def _wrap_load_model(orig):
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        plan = plan_of(self.vllm_config)
        self._vskip_state = None
        use_backend(plan is not None)
        result = orig(self, *args, **kwargs)
        if plan is not None:
            attach(self, plan)
        return result

    load_model._vskip_wrapped = True
    return load_model


def _step_facts(runner, num_tokens):
    """(decode_rows bool [num_tokens]) from the runner's input batch (prompt lengths, computed tokens)."""
    import numpy as np
    import torch

    ib = runner.input_batch
    num_reqs = ib.num_reqs
    qsl = runner.query_start_loc.cpu[: num_reqs + 1].numpy()
    if num_reqs == 0 or int(qsl[-1]) != num_tokens:
        return torch.zeros(num_tokens, dtype=torch.bool)  # dummy / profiling step: all prefill
    counts = np.diff(qsl)
    req_idx = np.repeat(np.arange(num_reqs), counts)
    pos = ib.num_computed_tokens_cpu[req_idx] + (np.arange(num_tokens) - qsl[req_idx])
    return torch.from_numpy(pos >= ib.num_prompt_tokens[req_idx])


def _wrap_model_forward(orig):
    @functools.wraps(orig)
    def _model_forward(self, *args, **kwargs):
        st = getattr(self, "_vskip_state", None)
        if st is None:
            return orig(self, *args, **kwargs)
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        md_all = ctx.attn_metadata
        if isinstance(md_all, list):
            md_all = md_all[0] if md_all else None
        first = st.layer_names[0]
        md = md_all.get(first) if isinstance(md_all, dict) else None
        if md is None:  # warm-up without metadata: layers run plainly
            st.end_step()
            return orig(self, *args, **kwargs)
        n = int(md.num_actual_tokens)
        positions = kwargs.get("positions")
        rows = positions.shape[-1] if positions is not None else n
        writes, seen = [], set()
        slot_maps = ctx.slot_mapping if isinstance(ctx.slot_mapping, dict) else {}
        for name in st.layer_names.values():
            layer = ctx.no_compile_layers[name]
            kv = layer.kv_cache
            if isinstance(kv, (list, tuple)):
                kv = kv[0]
            if kv is None or kv.numel() == 0 or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            sm = slot_maps.get(name, getattr(md_all.get(name), "slot_mapping", None))
            if sm is not None:
                writes.append((kv, sm, kv.shape[0] * kv.shape[2]))
        input_ids = self.input_ids.gpu[:n]
        st.begin_step(input_ids, n, rows, _step_facts(self, n), writes)
        try:
            return orig(self, *args, **kwargs)
        finally:
            st.end_step()

    _model_forward._vskip_wrapped = True
    return _model_forward


def _salted_hasher(hasher, hash_block_size):
    """Block hashes of blocks holding generated tokens made unique to their request."""

    def request_block_hasher(request):
        new = hasher(request)
        if not new:
            return new
        first = len(request.block_hashes)
        salt = b"vskip-generated:" + str(request.request_id).encode()
        out = []
        for i, h in enumerate(new):
            if (first + i + 1) * hash_block_size > request.num_prompt_tokens:
                h = type(h)(hashlib.sha256(bytes(h) + salt).digest())
            out.append(h)
        return out

    return request_block_hasher


def _wrap_get_request_block_hasher(orig):
    @functools.wraps(orig)
    def get_request_block_hasher(hash_block_size, *args, **kwargs):
        hasher = orig(hash_block_size, *args, **kwargs)
        salt = _SALT_NEXT_ENGINE[0]
        if not salt:
            # An engine-core process loads the plugin inside EngineCore.__init__ itself, after our
            # __init__ hook could have run: read the plan from the caller's config instead.
            caller = sys._getframe(1).f_locals
            cfg = caller.get("vllm_config") or getattr(caller.get("self"), "vllm_config", None)
            if cfg is not None:
                plan = plan_of(cfg)
                salt = plan is not None and bool(plan.decode_bypass_layers)
        return _salted_hasher(hasher, hash_block_size) if salt else hasher

    get_request_block_hasher._vskip_wrapped = True
    return get_request_block_hasher


def _wrap_engine_core_init(orig):
    @functools.wraps(orig)
    def __init__(self, vllm_config, *args, **kwargs):
        plan = plan_of(vllm_config)
        _SALT_NEXT_ENGINE[0] = plan is not None and bool(plan.decode_bypass_layers)
        try:
            return orig(self, vllm_config, *args, **kwargs)
        finally:
            _SALT_NEXT_ENGINE[0] = False

    __init__._vskip_wrapped = True
    return __init__


def _patch(owner, name, wrapper) -> None:
    cur = owner.__dict__.get(name)
    if cur is None or getattr(cur, "_vskip_wrapped", False):
        return
    setattr(owner, name, wrapper(cur))


def install() -> None:
    """Install the hooks (the plugin entry point calls this in every vLLM process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    ver = vllm_version()
    if not ver.startswith(TESTED_VLLM):
        logger.warning("vskip: tested with vLLM %s, running under %s", "/".join(TESTED_VLLM), ver)
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine import core as engine_core
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _patch(EngineArgs, "create_engine_config", _wrap_create_engine_config)
    prop = VllmConfig.__dict__.get("use_v2_model_runner")
    if isinstance(prop, property) and prop.fget is not None and not getattr(prop.fget, "_vskip_wrapped", False):
        VllmConfig.use_v2_model_runner = property(_wrap_use_v2_model_runner(prop.fget))
    _patch(GPUModelRunner, "load_model", _wrap_load_model)
    _patch(GPUModelRunner, "_model_forward", _wrap_model_forward)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a build without the CPU runner
        CPUModelRunner = None
    if CPUModelRunner is not None:
        _patch(CPUModelRunner, "load_model", _wrap_load_model)
        _patch(CPUModelRunner, "_model_forward", _wrap_model_forward)
    _patch(engine_core.EngineCore, "__init__", _wrap_engine_core_init)
    if not getattr(engine_core.get_request_block_hasher, "_vskip_wrapped", False):
        engine_core.get_request_block_hasher = _wrap_get_request_block_hasher(engine_core.get_request_block_hasher)
    _INSTALLED = True
