"""Ahead-of-time compilation of every Triton kernel configuration, no GPU needed.

Each Triton module exposes ``aot_specs() -> list[AotSpec]``: one entry per
(autotune config x specialisation) it can launch. ``compile_spec`` compiles one
for a ``GPUTarget`` and reports its shared memory, which the compile gate in the
tests checks against each architecture's limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Max dynamic shared memory per block (bytes) a kernel may use on each target.
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_LIMITS)

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class AotSpec:
    name: str  # human-readable id, used as the pytest id
    fn: Any  # the @triton.jit function (not the autotuner wrapper)
    signature: dict  # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # targets the config is launched on (autotune prunes configs by each target's smem)
    targets: tuple = TARGETS
    # per-parameter specialisation attributes, as Triton applies them at run time
    # (16-byte divisibility of pointers and strides): without them the compiled kernel
    # is not the one that runs (no vectorised loads, no K/V pipeline, less smem).
    attrs: dict = field(default_factory=dict)


def compile_spec(spec: AotSpec, cc: int):
    """Compile ``spec`` for sm_<cc>; returns the compiled kernel (``.metadata.shared`` is its smem)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_jit_function(spec.fn), signature=spec.signature, constexprs=spec.constexprs,
                    attrs=spec.attrs or None)
    return triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )


def _jit_function(fn):
    """The compilable JITFunction behind ``fn``: unwraps autotuners/heuristics, and
    re-wraps the Python source when the interpreter (TRITON_INTERPRET=1) replaced it."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        if type(fn).__name__ == "InterpretedFunction":
            return JITFunction(fn.fn)
        fn = fn.fn
    return fn


def all_specs() -> list[AotSpec]:
    from . import triton_attention, triton_decode, triton_paged, triton_visual_mass

    specs = []
    for mod in (triton_attention, triton_decode, triton_visual_mass, triton_paged):
        specs.extend(mod.aot_specs())
    return specs
