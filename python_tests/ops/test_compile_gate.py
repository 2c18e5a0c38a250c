"""AOT compile gate: every Triton kernel configuration compiles for sm80/86/89/90 and
fits the target's shared memory.

Compilation runs in worker subprocesses without TRITON_INTERPRET: under the
interpreter, triton.language's own @jit helpers (tl.sum, tl.max, ...) are
interpreter functions and cannot be compiled. Two workers use both CI cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from python_tests import REPO_ROOT
from vskip_kernels.ops import aot

SPECS = aot.all_specs()
JOBS = [(s.name, cc) for s in SPECS for cc in aot.TARGETS if cc in getattr(s, "targets", aot.TARGETS)]

_WORKER = r"""
import json, sys
from vskip_kernels.ops import aot
by_name = {s.name: s for s in aot.all_specs()}
res = {}
for name, cc in json.loads(sys.argv[1]):
    try:
        res[f"{name}@{cc}"] = {"shared": int(aot.compile_spec(by_name[name], cc).metadata.shared)}
    except Exception as e:
        res[f"{name}@{cc}"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
print("@@RESULT@@" + json.dumps(res))
"""


def _run_workers(jobs, n_workers=2):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Interleave so that both workers get a mix of cheap and expensive configs.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(jobs[i::n_workers])],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_workers)
        if jobs[i::n_workers]
    ]
    results = {}
    for p in procs:
        out, err = p.communicate()
        marker = [line for line in out.splitlines() if line.startswith("@@RESULT@@")]
        if p.returncode != 0 or not marker:
            raise RuntimeError(f"compile worker failed (rc={p.returncode}):\n{err[-4000:]}")
        results.update(json.loads(marker[-1][len("@@RESULT@@") :]))
    return results


@pytest.fixture(scope="module")
def compiled():
    return _run_workers(JOBS)


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
