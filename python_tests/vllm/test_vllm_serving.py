"""Serving conditions beyond one plain engine: tensor parallelism (heads split across two ranks)
and preemption with recompute (a KV cache too small for the load). Greedy tokens of vLLM with a
plan still equal those of transformers with the same plan (``apply_skip_plan``), on the tiny fp32
LLaVA-1.5 checkpoint.

The tensor-parallel engines run in a subprocess (this file run as a script): they need
``VLLM_CPU_OMP_THREADS_BIND``, which vLLM caches with its other settings once an engine has started
in a process (the in-process engines of this suite come first), and each spawns one worker process
per rank."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm.entrypoints.llm")  # a bare namespace "vllm" (this folder) does not count

import harness as H

N_NEW = 8
TP = 2


# ----------------------------------------------------------------------------- shared
@contextlib.contextmanager
def one_thread():
    """transformers' reference on one thread: it runs beside engine processes on few cores, where
    torch's multi-threaded ops wait on each other (tens of times slower on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    path = H.BUILDERS["llava"](str(root / "llava"))
    plans = {
        "A": H.plan_file(root, "A", "llava", **H.PLAN_A),
        # PLAN_A without its decode-bypass layers: shows that bypass changes these tokens
        "A-no-bypass": H.plan_file(root, "A-nb", "llava", **{**H.PLAN_A, "decode_bypass_layers": []}),
    }
    return path, plans, H.HFReference(path)


# ----------------------------------------------------------------------------- tensor parallelism
# The paged kernel of the TP engine (additional_config["vskip_backend"]): None, the plugin's
# default (PyTorch on CPU), and "triton", the CUDA path's kernel in Triton's interpreter
# (TRITON_INTERPRET=1: slow, hence few prompts).
TP_BACKENDS = [None, "triton"]
TP_ITEMS = dict(n=3, seed=21)  # 3 prompts with 0, 1 and 2 images


def _cpu_bind(n: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each of n ranks its own allowed CPU(s). vLLM's automatic
    binding wants one NUMA node per rank ("Not enough allowed NUMA nodes" on a one-node machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        pytest.skip(f"tensor_parallel_size={n} needs {n} allowed CPUs, this process has {len(cpus)}")
    per = len(cpus) // n
    return "|".join(",".join(str(c) for c in cpus[r * per : (r + 1) * per]) for r in range(n))


def _rank_facts(worker):
    """What one rank's worker holds: its share of the heads, the plan, step kinds, slot kinds."""
    import hashlib

    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from vskip_kernels.kinds import KIND_VISUAL

    runner = worker.model_runner
    st = runner._vskip_state
    attn = runner.get_model().language_model.model.layers[0].self_attn
    kinds = [t.cpu() for t in st._slot_kinds.values()]  # per-slot token kinds, one tensor per cache
    return {
        "rank": get_tensor_model_parallel_rank(),
        "world": get_tensor_model_parallel_world_size(),
        "impl": type(attn.attn.impl).__name__,
        "heads": [attn.num_heads, attn.num_kv_heads],
        "plan": st.plan.to_dict(),
        "steps": dict(st.step_counts),
        "kinds": [hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in kinds],
        "visual_slots": [int((t == KIND_VISUAL).sum()) for t in kinds],
        "kernel": st.kernel,
        "kernel_calls": dict(st.kernel_calls),
    }


def _tp_main(path: str, plan: str, out: str, backends: str) -> None:
    """The subprocess: for each backend, a TP engine, greedy tokens of TP_ITEMS in one batch and
    each rank's facts (or the error), written to ``out`` as JSON."""
    import traceback

    res = {}
    for backend in backends.split(","):
        try:
            kw = {} if backend == "default" else {"backend": backend}
            llm = H.make_llm(path, plan, tensor_parallel_size=TP, **kw)
            try:
                tokens, outs = H.generate(llm, H.prompts("llava", **TP_ITEMS), N_NEW)
                res[backend] = {
                    "tokens": tokens,
                    "prompt_ids": [list(o.prompt_token_ids) for o in outs],
                    "ranks": llm.collective_rpc(_rank_facts),
                }
            finally:
                H.close(llm)
        except Exception:
            res[backend] = {"error": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def tp_runs(llava, tmp_path_factory):
    """One subprocess runs a TP engine per backend (one after the other; each spawns its workers);
    transformers' tokens are computed meanwhile."""
    path, plans, hf = llava
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_OMP_THREADS_BIND=_cpu_bind(TP),
        TRITON_INTERPRET="1",  # for the "triton" engine; the default one runs PyTorch on CPU anyway
        VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS="1",  # the results are written by then
    )
    backends = ",".join(b or "default" for b in TP_BACKENDS)
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "tp", path, plans["A"], str(out), backends],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with one_thread():
            items = H.prompts("llava", **TP_ITEMS)
            ref = hf.tokens(plans["A"], items, N_NEW)
            dense = hf.tokens(None, items, N_NEW)
            prompt_ids = [hf.encode(t, im)["input_ids"][0].tolist() for t, im in items]
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out.exists(), log[-6000:]
    return ref, dense, prompt_ids, json.loads(out.read_text())


@pytest.mark.parametrize("backend", TP_BACKENDS, ids=lambda b: b or "default")
def test_tensor_parallel_tokens_equal_transformers(tp_runs, backend):
    """tensor_parallel_size=2: each rank runs half of the heads (2 of 4 query heads, 1 of 2 KV
    heads) with the same plan, the same step kinds and the same per-slot token kinds; the batch's
    greedy tokens equal transformers' with the plan (vskip + frozen + decode-bypass layers)."""
    ref, dense, prompt_ids, runs = tp_runs
    got = runs[backend or "default"]
    assert "error" not in got, got.get("error", "")[-6000:]
    heads, kv_heads = H.ck.hm.HEADS, H.ck.hm.KV_HEADS
    assert heads % TP == 0 and kv_heads % TP == 0
    assert got["prompt_ids"] == prompt_ids
    assert got["tokens"] == ref, f"TP={TP}: vLLM {got['tokens']} != transformers {ref}"
    assert dense != ref, "the plan changes nothing on these prompts"
    ranks = sorted(got["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(TP)) and all(r["world"] == TP for r in ranks)
    kernel = backend or "torch"
    for r in ranks:
        assert r["impl"] == "VskipAttentionImpl", r
        assert r["heads"] == [heads // TP, kv_heads // TP], r
        assert r["plan"] == ranks[0]["plan"]
        assert r["steps"] == ranks[0]["steps"], "ranks saw different step kinds"
        assert r["kinds"] == ranks[0]["kinds"], "ranks hold different per-slot token kinds"
        assert min(r["visual_slots"]) > 0, r["visual_slots"]
        assert r["kernel"] == kernel and r["kernel_calls"][kernel] > 0, r
        assert sum(r["kernel_calls"].values()) == r["kernel_calls"][kernel], r
    assert ranks[0]["plan"]["decode_bypass_layers"] == H.PLAN_A["decode_bypass_layers"]
    assert ranks[0]["steps"]["prefill"] > 0 and ranks[0]["steps"]["decode"] > 0


# ----------------------------------------------------------------------------- preemption
PRE_NEW = 16
# (words, images) of the prompts: LLaVA's image is 4 tokens, no BOS. Lengths 31, 27, 22, 63, 50,
# 41, 30, 60, 45: most requests need a new 32-token block within a few generated tokens.
PRE_PROMPTS = [(31, 0), (23, 1), (14, 2), (63, 0), (46, 1), (33, 2), (30, 0), (52, 2), (41, 1)]
PRE_LENS = [31, 27, 22, 63, 50, 41, 30, 60, 45]
# 10 blocks, one of them vLLM's null block, for prompts that take 14 blocks and would need 21 at
# the end: requests wait, and running ones are preempted (and recomputed) as they grow. One
# request alone needs at most 3, so a single-request run on the same engine is never preempted.
PRE_BLOCKS = 10
PRE_MAX_LEN = 4 * H.BLOCK  # vLLM's admission check wants one max-length request to fit the cache


@pytest.fixture(scope="module")
def preemption_case(llava):
    """The prompts and transformers' tokens with PLAN_A (and a check that its decode-bypass layers
    change them: a recomputed generated token run through a bypassed layer would show)."""
    path, plans, hf = llava
    items = []
    for i, (words, k) in enumerate(PRE_PROMPTS):
        parts = H.ck.text_prompt(words, 2100 + i, False).split(" ")
        for j in range(k):
            parts.insert((j + 1) * len(parts) // (k + 1) + j, "<image>")
        items.append((" ".join(parts), [H.ck.image(2100 + 10 * i + j) for j in range(k)]))
    assert [len(hf.encode(*it)["input_ids"][0]) for it in items] == PRE_LENS
    with one_thread():
        ref = hf.tokens(plans["A"], items, PRE_NEW)
        no_bypass = hf.tokens(plans["A-no-bypass"], items, PRE_NEW)
    assert no_bypass != ref, "decode bypass changes nothing on these prompts"
    return items, ref


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preempted_requests_equal_single_runs(llava, preemption_case, prefix_caching):
    """A KV cache of PRE_BLOCKS blocks for nine requests whose prompts end a few tokens before a
    block boundary: vLLM preempts running requests and later prefills them again, prompt plus the tokens
    generated so far; those generated tokens are decode rows for the bypass rule (positions past
    the prompt) inside a prefill. Every output equals its single-request run and transformers'
    tokens. Without prefix caching a resumed request recomputes all its tokens; with it, it may
    get its own earlier blocks (generated tokens included) back from the cache."""
    path, plans, _ = llava
    items, ref = preemption_case
    llm = H.make_llm(
        path,
        plans["A"],
        max_model_len=PRE_MAX_LEN,
        num_gpu_blocks_override=PRE_BLOCKS,
        enable_prefix_caching=prefix_caching,
        disable_log_stats=False,  # RequestOutput.metrics.num_preemptions
    )
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine core (conftest)
        assert sched.kv_cache_manager.block_pool.num_gpu_blocks == PRE_BLOCKS
        resumed = []  # per resume: (tokens scheduled, the request's prompt tokens, all its tokens)
        schedule = sched.schedule

        def logging_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            for rid in out.scheduled_cached_reqs.resumed_req_ids:
                req = sched.requests[rid]
                resumed.append((out.num_scheduled_tokens[rid], req.num_prompt_tokens, req.num_tokens))
            return out

        sched.schedule = logging_schedule
        got, outs = H.generate(llm, items, PRE_NEW)
        preemptions = [o.metrics.num_preemptions for o in outs]
        single = []
        for it in items:
            toks, outs = H.generate(llm, [it], PRE_NEW)
            assert outs[0].metrics.num_preemptions == 0
            single += toks
    finally:
        H.close(llm)
    assert sum(preemptions) > 0, "no request was preempted: the test checks nothing"
    assert len(resumed) == sum(preemptions), (resumed, preemptions)
    assert any(n_all > n_prompt for _, n_prompt, n_all in resumed), f"no resume with generated tokens: {resumed}"
    if not prefix_caching:  # the whole request again, its generated tokens included
        assert all(n == n_all for n, _, n_all in resumed), resumed
    assert got == single, f"preempted run {got} != single runs {single} (preemptions {preemptions})"
    assert got == ref, f"preempted run {got} != transformers {ref} (preemptions {preemptions})"


if __name__ == "__main__" and sys.argv[1:2] == ["tp"]:
    _tp_main(*sys.argv[2:6])
