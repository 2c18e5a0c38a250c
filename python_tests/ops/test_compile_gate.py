"""AOT compile gate: every Triton kernel configuration compiles for sm80/86/89/90 and
fits the target's shared memory.

Compilation runs in ``static.inspect_all``'s worker subprocesses without TRITON_INTERPRET:
under the interpreter, triton.language's own @jit helpers (tl.sum, tl.max, ...) are
interpreter functions and cannot be compiled. Two workers use both CI cores.
"""

from __future__ import annotations

import pytest

from vskip_kernels.ops import aot, static

SPECS = aot.all_specs()
JOBS = static.all_jobs(SPECS)


@pytest.fixture(scope="module")
def compiled():
    # one compile pass per (spec, target), shared with the static report's readers
    return static.inspect_all(JOBS, workers=2)


@pytest.mark.parametrize("name,cc", JOBS, ids=[f"{n}-sm{cc}" for n, cc in JOBS])
def test_compiles_within_smem(compiled, name, cc):
    res = compiled[f"{name}@{cc}"]
    assert "error" not in res, f"{name} failed to compile for sm{cc}: {res.get('error')}"
    assert res["shared"] <= aot.SMEM_LIMITS[cc], (
        f"{name} uses {res['shared']} bytes of shared memory, sm{cc} allows {aot.SMEM_LIMITS[cc]}"
    )


def test_every_target_has_a_config_per_head_dim_and_dtype():
    from vskip_kernels.ops.triton import attention as ta

    for cc in aot.TARGETS:
        for dtype in ("fp16", "bf16", "fp32"):
            for d in ta.HEAD_DIMS:
                bm, bn = ta._default_blocks(cc, dtype, d)
                assert ta.configs_for(cc, dtype, d, bm, bn), (cc, dtype, d, bm, bn)


def test_smem_estimate_bounds_measured(compiled):
    """Runtime pruning trusts smem_estimate: it must never be below the real allocation."""
    from vskip_kernels.ops.triton import attention as ta

    for spec in SPECS:
        if not spec.name.startswith("attn_"):
            continue
        c = spec.constexprs
        for cc in spec.targets:
            est = ta.smem_estimate(
                cc, c["BLOCK_M"], c["BLOCK_N"], c["HEAD_DIM"], spec.signature["Q"][1:], spec.num_stages
            )
            res = compiled[f"{spec.name}@{cc}"]
            if "shared" in res:
                assert res["shared"] <= est, (spec.name, cc, res["shared"], est)


def test_gate_compiles_with_runtime_specialisation(compiled):
    """At run time Triton specialises 16-byte-aligned pointers/strides, which enables the
    vectorised, multi-buffered K/V pipeline; the gate must compile with the same
    ``attrs`` or it measures a kernel that never runs (far less shared memory)."""
    spec = next(s for s in SPECS if s.name.startswith("attn_fp16_d128_m128n64") and s.num_stages >= 3)
    c = spec.constexprs
    kv_pipeline = spec.num_stages * 2 * c["BLOCK_N"] * c["BLOCK_D"] * 2 - 2 * c["BLOCK_N"] * c["BLOCK_D"] * 2
    shared = compiled[f"{spec.name}@80"]["shared"]
    assert shared >= kv_pipeline, (
        f"{spec.name} compiled with {shared} bytes of smem, below its {spec.num_stages}-stage K/V pipeline "
        f"({kv_pipeline}): aot.compile_spec must pass AotSpec attrs to ASTSource"
    )
