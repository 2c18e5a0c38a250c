"""vLLM's own Triton paged attention as a measured peer of our paged kernel (static report).

``python -m vskip_kernels.bench.vllm_peer --out FILE.json`` compiles vLLM's
``kernel_unified_attention`` (``vllm/v1/attention/ops/triton_unified_attention.py``, the kernel of
the ``TRITON_ATTN`` backend) at the shapes our paged kernel serves — head dim 128, KV block
size 16 and 32, GQA groups 1 and 4, fp16 and bf16 — for sm80 and sm90, and reads each compile
with ``ops.static.inspect_spec`` (registers, spills, SASS mix, the main KV loop). Runs only where
vLLM is importable (the vLLM test environment); vLLM is imported lazily.

Nothing is chosen by hand that vLLM's launcher chooses: ``decode_launch`` calls vLLM's own
``unified_attention(...)`` with the arguments ``TritonAttentionImpl.forward`` passes it for a
decode batch (KV cache in the backend's layout, scales, no sinks, sliding window, softcap,
ALiBi, fp8, qq_bias or multimodal prefix), intercepts the kernel launch, and turns the
launch's keyword arguments into a compile signature with Triton's own argument binder
(``launch_spec``): every parameter's type as Triton sees it at launch (``*fp16``, ``i32``,
``i64`` for the ``tl.int64``-annotated strides, ``fp32``, ``constexpr`` for the constexprs and
the ``None`` pointers), the constexpr values, the ``tt.divisibility=16`` attributes of the
pointers and integers that arrive 16-divisible, and the launch options (``num_warps`` and
``num_stages``: the launcher leaves both to Triton's defaults at head dim 128).

The launcher's choice for a decode batch at head dim 128 (vLLM 0.32): the 2D kernel
(``IS_3D=False``) whenever the batch holds more sequences than ``seq_threshold_3D`` = 128 //
kv heads (or has a prefill); BLOCK_M = 16 query rows (heads x tokens) per program, BLOCK_Q =
16 // group tokens, TILE_SIZE = 32 keys per loop iteration (the 2D path always takes the
"prefill" tile size; 16 is the 3D split-KV kernel's), Triton's default 4 warps and 3 stages; no
choice depends on the target (only head dim 256 on sm100 is tuned) or on the block size
(BLOCK_SIZE is a constexpr of the addressing only; tensor descriptors are XPU-only).

vLLM's CPU wheel disables Triton (no CPU backend: ``vllm.triton_utils.HAS_TRITON`` is False)
and its ``@triton.jit`` becomes a no-op, so ``kernel_module`` executes the kernel's source
again over the real ``triton`` (``fresh_kernel_module``): the kernel source this vLLM ships,
which a build with Triton enabled imports as is. Under ``TRITON_INTERPRET=1`` the fresh module's kernels are
interpreter functions, which is how ``python_tests/vllm/test_paged_peer.py`` runs vLLM's kernel
on CPU tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field

from ..ops.triton.spec import AotSpec

FORMAT = "vskip-static-peer/1"
PEER = "vllm triton_unified_attention"
UNIFIED = "vllm.v1.attention.ops.triton_unified_attention"
HELPERS = "vllm.v1.attention.ops.triton_attention_helpers"

# The shapes our paged kernel serves, and the targets the peer is compiled for.
HEAD_DIM = 128
BLOCK_SIZES = (16, 32)
GROUPS = (1, 4)  # num_queries_per_kv
DTYPES = ("fp16", "bf16")
TARGETS = (80, 90)
# A 7B decoder's 32 query heads (num_query_heads is a constexpr of vLLM's kernel); kv heads 32 / 8.
NUM_QUERY_HEADS = 32
# A decode batch above every seq_threshold_3D here (128 // kv heads: 4 and 16), so vLLM's
# launcher takes the 2D kernel; 40 is a CUDA-graph capture size, not 16-divisible (num_seqs is
# an i32 argument Triton specialises on 16-divisibility; it only bounds a binary search).
DECODE_SEQS = 40
# The block table's row stride is max_model_len // block_size: 16-divisible for a 32k context.
MAX_MODEL_LEN = 32768


# ----------------------------------------------------------------------------- vLLM's kernel


_MISSING = object()


@contextlib.contextmanager
def _swapped(obj, **attrs):
    """``obj``'s attributes set to ``attrs`` inside the block, restored (or removed) after it."""
    saved = {k: getattr(obj, k, _MISSING) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is _MISSING:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


def _exec_module(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name} is not importable here")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fresh_kernel_module():
    """vLLM's ``triton_unified_attention`` module executed again over the real ``triton``
    (and its jit helpers' module with it), leaving vLLM's own imported modules untouched."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as tu

    with _swapped(tu, triton=triton, tl=tl, tldevice=tldevice, HAS_TRITON=True):
        helpers = _exec_module(HELPERS)
        saved = sys.modules.get(HELPERS)
        sys.modules[HELPERS] = helpers  # the kernel module's `from ...helpers import` takes these
        try:
            return _exec_module(UNIFIED)
        finally:
            if saved is None:
                sys.modules.pop(HELPERS, None)
            else:
                sys.modules[HELPERS] = saved


@functools.cache
def kernel_module():
    """vLLM's ``triton_unified_attention`` with real Triton kernels (interpreter functions
    under ``TRITON_INTERPRET=1``): vLLM's own module where its Triton is enabled, else
    ``fresh_kernel_module()``."""
    import vllm.triton_utils as tu

    if tu.HAS_TRITON:
        return importlib.import_module(UNIFIED)
    return fresh_kernel_module()


def vllm_version() -> str:
    import vllm

    return vllm.__version__


# ----------------------------------------------------------------------------- the backend's arguments


def kv_cache_views(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device="cpu"):
    """(key_cache, value_cache) [num_blocks, block_size, Hkv, D] as ``TritonAttentionImpl.forward``
    hands them to ``unified_attention``: one layer's cache is allocated in vLLM's default physical
    layout (LBNHC: block, slot, head, then K and V content side by side), seen in the logical
    (block, head, slot, 2 * D) order, transposed and split (non-contiguous views: slot stride
    Hkv * 2D, head stride 2D)."""
    import torch

    phys = torch.zeros(num_blocks, block_size, num_kv_heads, 2 * head_dim, dtype=dtype, device=device)
    kv_cache = phys.permute(0, 2, 1, 3)  # the logical (B, H, N, 2 * hs) view the backend receives
    kv_cache = kv_cache.transpose(1, 2)  # forward(): kv_cache.transpose(1, 2).split(hs, dim=-1)
    key_cache, value_cache = kv_cache.split(head_dim, dim=-1)
    return key_cache, value_cache


def backend_args(
    q, key_cache, value_cache, out, block_table, seq_lens, query_start_loc, *, softmax_scale=None, threshold_3d=True
) -> dict:
    """The keyword arguments ``TritonAttentionImpl.forward`` passes to ``unified_attention`` for
    a plain decoder layer (causal, no sliding window / softcap / ALiBi / sinks / fp8 / qq_bias /
    multimodal prefix, KV quantisation NONE, no tensor descriptors on CUDA). ``threshold_3d``:
    the metadata builder's 3D scratch buffers and ``seq_threshold_3D`` = 128 // kv heads (the
    launcher then picks 2D or 3D itself); False passes none (always the 2D kernel)."""
    import torch
    from vllm.v1.kv_cache_interface import KVQuantMode

    num_seqs, hq, d, hkv = seq_lens.shape[0], q.shape[1], q.shape[2], key_cache.shape[2]
    qlens = query_start_loc[1:] - query_start_loc[:-1]
    ones = torch.ones((), dtype=torch.float32, device=q.device)  # layer._k_scale / _v_scale
    args = dict(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=query_start_loc,
        max_seqlen_q=int(qlens.max()),
        seqused_k=seq_lens,
        max_seqlen_k=int(seq_lens.max()),
        softmax_scale=float(softmax_scale if softmax_scale is not None else d**-0.5),
        causal=True,
        alibi_slopes=None,
        use_alibi_sqrt=False,
        window_size=(-1, -1),
        block_table=block_table,
        softcap=0,  # logits_soft_cap None -> 0
        q_descale=None,
        k_descale=ones.expand(num_seqs, hkv),
        v_descale=ones.expand(num_seqs, hkv),
        sinks=None,
        output_scale=None,
        mm_prefix_range=None,
        rswa_prefix_lens=None,
        rswa_window=None,
        kv_quant_mode=KVQuantMode.NONE,
        k_scale_cache=None,
        v_scale_cache=None,
        chunk_lookback=-1,
        use_td=False,
        mm_prefix_clamp_sliding_window=False,
    )
    if threshold_3d:
        segments, threshold = 16, 128 // hkv  # NUM_PAR_SOFTMAX_SEGMENTS, MIN_LAUNCH_GRID_SIZE_2D // Hkv
        pad = 1 << (d - 1).bit_length()
        f32 = dict(dtype=torch.float32, device=q.device)
        args.update(
            seq_threshold_3D=threshold,
            num_par_softmax_segments=segments,
            softmax_segm_output=torch.empty(threshold, hq, segments, pad, **f32),
            softmax_segm_max=torch.empty(threshold, hq, segments, **f32),
            softmax_segm_expsum=torch.empty(threshold, hq, segments, **f32),
        )
    return args


class _Launch:
    """Stands in for ``kernel_unified_attention`` during one launcher call: records the grid
    and keyword arguments of the launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append((grid, kwargs))


def decode_launch(dtype: str, block_size: int, group: int, head_dim: int = HEAD_DIM) -> tuple[tuple, dict]:
    """(grid, keyword arguments) of the kernel launch vLLM's ``unified_attention`` makes for a
    decode batch of ``DECODE_SEQS`` one-token requests at these shapes."""
    import torch

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    mod = kernel_module()
    hkv = NUM_QUERY_HEADS // group
    n = DECODE_SEQS
    max_blocks = MAX_MODEL_LEN // block_size
    key_cache, value_cache = kv_cache_views(4, block_size, hkv, head_dim, tdt)
    q = torch.zeros(n, NUM_QUERY_HEADS, head_dim, dtype=tdt)
    args = backend_args(
        q,
        key_cache,
        value_cache,
        torch.zeros_like(q),
        torch.zeros(n, max_blocks, dtype=torch.int32),
        torch.full((n,), 100, dtype=torch.int32),
        torch.arange(n + 1, dtype=torch.int32),
    )
    launch = _Launch()
    with _swapped(mod, kernel_unified_attention=launch):
        mod.unified_attention(**args)
    if len(launch.calls) != 1 or launch.calls[0][1]["IS_3D"]:
        raise RuntimeError(f"vLLM's launcher did not make one 2D launch for a decode batch: {launch.calls}")
    return launch.calls[0]


def launch_spec(fn, kwargs: dict, cc: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch ``fn[grid](**kwargs)`` on sm_<cc>,
    from Triton's own argument binder and packer (``JITFunction.run``'s path), without a GPU:
    types, constexpr values and divisibility attributes exactly as the launch specialises them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, {})
    names = list(bound)
    constexprs = {names[path[0]]: v for path, v in constexprs.items()}
    attrs = {path: a for path, a in attrs.items() if a}
    return signature, constexprs, attrs, {"num_warps": options.num_warps, "num_stages": options.num_stages}


@dataclass(frozen=True)
class PeerSpec:
    spec: AotSpec
    cc: int
    meta: dict = field(default_factory=dict)  # tile_size, block_size, group, dtype, head_dim, launch


def spec_name(dtype: str, block_size: int, group: int, head_dim: int = HEAD_DIM) -> str:
    return f"vllm_unified_{dtype}_d{head_dim}_bs{block_size}_g{group}"


def peer_specs(targets=TARGETS, dtypes=DTYPES, block_sizes=BLOCK_SIZES, groups=GROUPS) -> list[PeerSpec]:
    """One ``AotSpec`` per (dtype, block size, group, target): vLLM's decode launch, compiled as
    it launches (needs the compilable kernel: not under ``TRITON_INTERPRET``)."""
    from triton.runtime.jit import JITFunction

    fn = kernel_module().kernel_unified_attention
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"vLLM's kernel is a {type(fn).__name__}, not a compilable JITFunction (TRITON_INTERPRET set?)"
        )
    out = []
    for dtype in dtypes:
        for bs in block_sizes:
            for g in groups:
                grid, kwargs = decode_launch(dtype, bs, g)
                for cc in targets:
                    signature, constexprs, attrs, options = launch_spec(fn, kwargs, cc)
                    spec = AotSpec(
                        name=spec_name(dtype, bs, g),
                        fn=fn,
                        signature=signature,
                        constexprs=constexprs,
                        attrs=attrs,
                        targets=(cc,),
                        **options,
                    )
                    launch = {k: constexprs[k] for k in ("BLOCK_M", "BLOCK_Q", "TILE_SIZE", "num_query_heads", "IS_3D")}
                    launch.update(options, grid=list(grid), num_seqs=DECODE_SEQS)
                    meta = dict(
                        tile_size=constexprs["TILE_SIZE"],
                        block_size=bs,
                        group=g,
                        dtype=dtype,
                        head_dim=HEAD_DIM,
                        launch=launch,
                    )
                    out.append(PeerSpec(spec, cc, meta))
    return out


# ----------------------------------------------------------------------------- the report


def inspect_peers(peers: list[PeerSpec], log=None) -> dict[str, dict]:
    """``"name@cc" -> KernelReport dict + meta`` (or ``{"error": ..., **meta}``), compiled in
    this process, one after the other."""
    from ..ops import static

    out = {}
    for p in peers:
        key = f"{p.spec.name}@{p.cc}"
        t0 = time.perf_counter()
        try:
            res = static.inspect_spec(p.spec, p.cc).as_dict()
        except Exception as e:  # recorded, and the CLI fails
            res = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        out[key] = {**res, **p.meta}
        if log:
            log(f"[vllm-peer] {key}: {time.perf_counter() - t0:.1f} s")
    return out


def table(kernels: dict[str, dict]) -> str:
    """name@cc: registers, spills, loop instructions, loop MMAs, LDGSTS, TILE_SIZE."""
    head = ("kernel", "regs", "spill st/ld", "loop instr", "loop MMA", "LDGSTS", "tile", "instr/key")
    rows = [head]
    for key, r in kernels.items():
        if "error" in r:
            rows.append((key, "error", "", "", "", "", str(r["tile_size"]), ""))
            continue
        rows.append(
            (
                key,
                str(r["registers"]),
                f"{r['spill_stores']}/{r['spill_loads']}",
                str(r["loop_instructions"]),
                str(r["loop_mma"]),
                str(r["async_copy"]),
                str(r["tile_size"]),
                f"{r['loop_instructions'] / r['tile_size']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vskip_kernels.bench.vllm_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--targets", nargs="+", type=int, default=list(TARGETS), metavar="CC", help="default: 80 90")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no"):
        raise SystemExit(
            "vllm_peer compiles kernels for GPU targets, which Triton cannot do under its interpreter: "
            "unset TRITON_INTERPRET and run again"
        )
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated: silences its warning
    import triton

    from ..ops import static

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    peers = peer_specs(targets=tuple(args.targets))
    log(f"[vllm-peer] vLLM {vllm_version()}: compiling {len(peers)} (configuration, target) pairs")
    kernels = inspect_peers(peers, log)
    doc = {
        "format": FORMAT,
        "peer": PEER,
        "vllm": vllm_version(),
        "triton": triton.__version__,
        "tools": static.tool_versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "kernels": kernels,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(table(kernels))
    failed = [k for k, r in kernels.items() if "error" in r]
    if failed:
        log(f"[vllm-peer] {len(failed)} compile(s) failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
