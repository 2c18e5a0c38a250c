"""AOT compile gate: every Triton kernel configuration the launchers can run compiles for
sm80/86/90 into code the GPU runs well, read without a GPU (``ops/static.py``): within the
target's shared memory and registers, no register spill and no local-memory instruction, and
tensor-core MMAs in the main loop of every fp16/bf16 attention kernel (``static.violations``).
The registry (``aot.all_specs``) lists every configuration each launcher (and the prefill
autotuner) can pick, so the gate covers what can run, not a sample (checked per launcher:
test_triton_attention.py and test_paged_triton.py compare their registries with what they
can launch).

sm89 (L40S, RTX 40xx) is left to the full report (``vskip bench static``, committed under
bench/results/, and ``VSKIP_GATE_SM89=1`` here) to keep CI's compile time in bounds: it has
sm86's register file and shared memory, the launchers pick the same configurations for both
(``test_sm89_launches_what_sm86_does``), and ptxas's output for the two matched in 41 of 42
kernels of the first full report (the other: 2 registers apart in a merge kernel).

Compilation runs in ``static.inspect_all``'s worker subprocesses without TRITON_INTERPRET:
under the interpreter, triton.language's own @jit helpers (tl.sum, tl.max, ...) are
interpreter functions and cannot be compiled. Two workers use both CI cores.
"""

from __future__ import annotations

import os

import pytest

from vskip_kernels.ops import aot, static

SPECS = aot.all_specs()
GATE_TARGETS = (80, 86, 89, 90) if os.environ.get("VSKIP_GATE_SM89") == "1" else (80, 86, 90)
JOBS = [(name, cc) for name, cc in static.all_jobs(SPECS) if cc in GATE_TARGETS]


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


@pytest.mark.parametrize("name,cc", JOBS, ids=[f"{n}-sm{cc}" for n, cc in JOBS])
def test_static_quality(compiled, name, cc):
    bad = static.violations(name, cc, compiled[f"{name}@{cc}"])
    assert not bad, f"{name} on sm{cc}: " + "; ".join(bad)


def test_the_gate_refuses_what_it_should():
    """The rules on hand-made results: a clean fp16 attention kernel passes; a spill, a local
    access, a missing MMA, too much shared memory each fail; fp32 (FMA dots) needs no MMA."""
    ok = dict(spill_stores=0, spill_loads=0, local=0, registers=200, shared=64 * 1024, ctas_per_sm=1, loop_mma=32)
    assert static.violations("attn_fp16_d128_m64n64_w4s2", 86, ok) == []
    assert static.violations("attn_fp32_d128_m32n32_w4s2", 86, {**ok, "loop_mma": 0}) == []
    assert static.violations("decode_merge_fp16_bd128", 80, {**ok, "loop_mma": 0}) == []
    for bad, what in [
        ({"spill_stores": 8}, "spills"),
        ({"local": 3}, "local-memory"),
        ({"loop_mma": 0}, "tensor-core"),
        ({"shared": 100 * 1024}, "shared memory"),
        ({"ctas_per_sm": 0}, "no CTA"),
    ]:
        got = static.violations("paged_bf16_d128_bs16", 86, {**ok, **bad})
        assert len(got) == 1 and what in got[0], (bad, got)
    assert "compile error" in static.violations("paged_fp16_d64_bs16", 80, {"error": "boom"})[0]
    with pytest.raises(ValueError, match="family"):
        static.family("unknown_kernel")


def test_sm89_launches_what_sm86_does():
    """What lets the gate leave sm89 to the full report: the same registered configurations."""
    on = {cc: {s.name for s in SPECS if cc in s.targets} for cc in (86, 89)}
    assert on[86] == on[89]


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
            res = compiled.get(f"{spec.name}@{cc}", {})  # targets outside GATE_TARGETS: not compiled
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
