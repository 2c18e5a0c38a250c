"""Ahead-of-time compilation of every Triton kernel configuration, no GPU needed.

The compile gate's leaf: each Triton launcher registers a ``() -> list[AotSpec]``
provider with ``triton.spec.register_specs`` (one entry per autotune config x
specialisation it can launch); ``all_specs`` imports the launchers so the registry is
full, and ``compile_spec`` compiles one spec for a ``GPUTarget`` and reports its shared
memory, which the tests check against each architecture's limit. Nothing in the
package imports this module.
"""

from __future__ import annotations

import importlib

from .triton.spec import SMEM_LIMITS, TARGETS, TRITON_DTYPES, AotSpec, registered_specs  # noqa: F401

# The modules whose import registers specs; a new Triton launcher is added here.
KERNEL_MODULES = ("triton.attention", "triton.decode", "triton.visual_mass", "triton.paged", "triton.received")


def compile_spec(spec: AotSpec, cc: int):
    """Compile ``spec`` for sm_<cc>; returns the compiled kernel (``.metadata.shared`` is its smem)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=_jit_function(spec.fn), signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs or None
    )
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
    for name in KERNEL_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    return registered_specs()
