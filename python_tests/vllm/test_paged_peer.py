"""vLLM's own Triton paged attention (``kernel_unified_attention`` of
``vllm/v1/attention/ops/triton_unified_attention.py``, the TRITON_ATTN backend's kernel) beside
ours (``ops/triton/paged.py``), in the vLLM environment.

Correctness, under Triton's interpreter on CPU tensors: vLLM's launcher ``unified_attention``,
called with the arguments the backend's ``forward`` passes (``bench/vllm_peer.backend_args``), and
our ``paged_attention_triton(..., policy="dense")`` read the same paged cache — ours as
[num_blocks, Hkv, block_size, D] with int8 slot kinds, vLLM's as the backend's views of one
layer's cache in vLLM's default physical layout (block, slot, head, K|V content;
``vllm_peer.kv_cache_views``) — for mixed prefill + decode requests (``MIXED``: full prefill,
chunked prefill, decode rows), GQA groups 1 and 4, block size 16, fp16 and fp32. Each result is
held to the float64 reference by the tolerance rule (``assert_rule``), and the two results to
each other within the same budget.

vLLM's kernel runs under the interpreter once it is a Triton kernel at all: vLLM's CPU wheel
disables Triton (no CPU backend in the triton wheel, ``vllm.triton_utils.HAS_TRITON`` False), so
its ``@triton.jit`` is a no-op and its ``tl`` a placeholder; ``vllm_peer.kernel_module`` executes
the kernel's source again over the real ``triton``. Then it runs as is. What the interpreter
cannot show:

* bf16: the interpreter's ``tl.dot`` is ``np.matmul`` over bf16's raw uint16 storage
  (``interpreter.create_dot``), so a bf16 dot is garbage there (vLLM's output was off by ~8e8 in
  a trial). Our kernel sidesteps it with fp32 dots of bf16 operands under the interpreter; vLLM's
  does not, so bf16 is not compared here.
* fp32: the interpreter ignores ``input_precision``; vLLM's fp32 dots are TF32 on a GPU (ours are
  IEEE), exact fp32 here. The comparison is therefore run under the interpreter only.
* vLLM's epilogue divides the rows past a request's last query in its last query block by a
  zero softmax sum (0 / 0, never stored); numpy warns, the warning is filtered.

Static: ``python -m vskip_kernels.bench.vllm_peer`` compiles the peer configurations for sm80
in a subprocess without ``TRITON_INTERPRET`` (about 15 s here), and each compile must hold
tensor-core MMAs in its main KV loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm.v1.attention.ops.triton_unified_attention")  # not the bare "vllm" namespace

from python_tests._shared import ATOL, assert_rule
from python_tests.ops._paged import MIXED, make_case, paged_args, reference
from vskip_kernels.bench import vllm_peer as vp
from vskip_kernels.ops.dispatch import interpreter_on
from vskip_kernels.ops.triton.paged import paged_attention_triton
from vskip_kernels.reference import attention_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vllm(case, hkv):
    """vLLM's launcher on ``case``'s cache, copied into the backend's layout."""
    kc, vc = case["k_cache"], case["v_cache"]
    nb, _, bs, d = kc.shape
    key_cache, value_cache = vp.kv_cache_views(nb, bs, hkv, d, kc.dtype)
    key_cache.copy_(kc.permute(0, 2, 1, 3))
    value_cache.copy_(vc.permute(0, 2, 1, 3))
    out = torch.full_like(case["q"], float("nan"))
    args = vp.backend_args(
        case["q"], key_cache, value_cache, out, case["block_table"], case["seq_lens"], case["query_start_loc"]
    )
    vp.kernel_module().unified_attention(**args)
    return out


def _ours(case):
    return paged_attention_triton(
        *paged_args(case),
        policy="dense",
    )


def _reference64(case):
    outs = []
    for q, k, v, vis in case["per_req"]:
        o, _, _ = attention_ref(q.double(), k.double(), v.double(), vis, policy="dense")
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.skipif(not interpreter_on(), reason="the comparison runs in Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)])
def test_vllm_unified_attention_and_ours_match_the_reference(dtype, heads):
    hq, hkv = heads
    case = make_case(MIXED, hq=hq, hkv=hkv, d=64, bs=16, dtype=dtype, seed=11)
    ref64 = _reference64(case)
    reflp = reference(case, "dense", upcast=False)
    theirs, ours = _vllm(case, hkv), _ours(case)
    assert theirs.dtype == ours.dtype == dtype and theirs.shape == ours.shape == case["q"].shape
    assert_rule("vllm unified_attention", theirs, ref64, reflp)
    assert_rule("paged_attention_triton", ours, ref64, reflp)
    # each other: within the budget each has against the reference
    err = (theirs.double() - ours.double()).abs().max().item()
    lim = 2 * (reflp.double() - ref64).abs().max().item() + ATOL
    assert err <= lim, f"vLLM vs ours: max difference {err:.3g} > {lim:.3g}"


def test_peer_cli_refuses_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        vp.main(["--out", str(tmp_path / "peer.json")])
    assert not (tmp_path / "peer.json").exists()


def test_peer_specs_compile_for_sm80_with_tensor_cores(tmp_path):
    out = tmp_path / "peer.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, "-m", "vskip_kernels.bench.vllm_peer", "--out", str(out), "--targets", "80"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["format"] == vp.FORMAT and doc["peer"] == vp.PEER and doc["vllm"] and doc["triton"]
    want = {f"{vp.spec_name(dt, bs, g)}@80" for dt in vp.DTYPES for bs in vp.BLOCK_SIZES for g in vp.GROUPS}
    assert set(doc["kernels"]) == want
    for key, r in doc["kernels"].items():
        assert "error" not in r, (key, r.get("error"))
        assert r["cc"] == 80 and r["head_dim"] == vp.HEAD_DIM, key
        assert r["mma"] > 0 and r["loop_mma"] > 0 and r["opcodes"].get("HMMA"), (key, r["opcodes"])
        launch = r["launch"]
        # the launcher's 2D decode kernel: BLOCK_M query rows = BLOCK_Q tokens x the GQA group
        assert launch["IS_3D"] is False and launch["BLOCK_Q"] * r["group"] == launch["BLOCK_M"], (key, launch)
        assert r["tile_size"] == launch["TILE_SIZE"] and r["num_warps"] == launch["num_warps"], (key, launch)
