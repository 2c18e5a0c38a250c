"""Acceptance: greedy tokens of vLLM with a plan equal those of transformers with the same plan
(``apply_skip_plan``), for tiny fp32 LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL checkpoints; batch and one by one,
prompts of different lengths with 0-2 images; chunked prefill; prefix caching (a cached
prefix, a one-token prefill after a hit, a multi-turn prompt that repeats an answer); and a
64-request load test. Engines are shared per module (one start is seconds on 2 cores)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm")  # a bare namespace "vllm" (this folder) does not count

import harness as H

N_NEW = 8
IMAGE_ID = H.ck.hm.IMAGE_ID


class Family:
    def __init__(self, fam, root):
        self.fam = fam
        self.path = H.BUILDERS[fam](str(root / fam))
        self.hf = H.HFReference(self.path)
        self.plans = {
            name: H.plan_file(root, f"{fam}-{name}", fam, **layers)
            for name, layers in (
                ("A", H.PLAN_A),
                ("B", H.PLAN_B),
                ("C", H.PLAN_C),
                ("V", {"vskip_layers": [0, 1, 2, 3]}),
            )
        }
        self.engines = {}

    def engine(self, key, plan, **kw):
        if key not in self.engines:
            for old in list(self.engines):  # one engine alive at a time: bounded memory
                H.close(self.engines.pop(old))
            self.engines[key] = H.make_llm(self.path, self.plans[plan], **kw)
        return self.engines[key]

    def close(self):
        for k in list(self.engines):
            H.close(self.engines.pop(k))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    fams = {}
    yield lambda fam: fams.setdefault(fam, Family(fam, root))
    for f in fams.values():
        f.close()


def _check_against_hf(f, llm, plan, items, n=N_NEW):
    ref = f.hf.tokens(f.plans[plan], items, n)
    batch, outs = H.generate(llm, items, n)
    for i, (o, (text, imgs)) in enumerate(zip(outs, items)):
        assert list(o.prompt_token_ids) == f.hf.encode(text, imgs)["input_ids"][0].tolist(), f"prompt {i} differs"
    assert batch == ref, f"batch: vLLM {batch} != transformers {ref}"
    single = [H.generate(llm, [it], n)[0][0] for it in items]
    assert single == ref, f"one by one: vLLM {single} != transformers {ref}"
    return ref


@pytest.mark.parametrize(
    "fam,plan", [("llava", "A"), ("llava", "B"), ("llava_next", "C"), ("qwen2_vl", "A"), ("qwen2_5_vl", "B")]
)
def test_plan_tokens_equal_transformers(families, fam, plan):
    f = families(fam)
    llm = f.engine(plan, plan)
    impl, _ = H.plan_state(llm)
    assert impl == "VskipAttentionImpl"
    items = H.prompts(fam, 6, seed=11)
    ref = _check_against_hf(f, llm, plan, items)
    dense = f.hf.tokens(None, items, N_NEW)
    assert dense != ref, "the plan changes nothing on these prompts: the comparison would not catch a no-op backend"
    counts = H.plan_state(llm)[1]
    assert counts["prefill"] > 0 and counts["decode"] > 0


def test_generated_placeholder_id_is_text(families):
    """This prompt makes the model emit its own image placeholder id; fed back on a decode step it
    gets the id's text embedding, so it is a text token in every layer (as in transformers)."""
    f = families("llava_next")
    llm = f.engine("C", "C")
    item = (H.ck.text_prompt(12, 2, True), [H.ck.image(2)])
    got = H.generate(llm, [item], N_NEW)[0]
    assert IMAGE_ID in got[0][:-1]
    assert got == f.hf.tokens(f.plans["C"], [item], N_NEW)


def test_chunked_prefill_gives_the_same_tokens(families):
    """A 16-token budget splits prompts (and images) across steps and mixes decode rows of early
    requests with prefill rows of later ones: bypass then applies to the decode rows only."""
    f = families("llava")
    llm = f.engine("A-chunked", "A", max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False)
    items = H.prompts("llava", 6, seed=12, min_words=20, max_words=60)
    ref = f.hf.tokens(f.plans["A"], items, N_NEW)
    got, _ = H.generate(llm, items, N_NEW)
    assert got == ref
    counts = H.plan_state(llm)[1]
    assert counts["mixed"] > 0, counts
    # alone, a request's chunks are [0, 16), [16, 32), ...: put an image across the first boundary
    words = H.ck.text_prompt(30, 1201, False).split(" ")
    item = (" ".join(words[:14] + ["<image>"] + words[14:]), [H.ck.image(1201)])
    ids = f.hf.encode(*item)["input_ids"][0].tolist()
    assert ids[14:18] == [IMAGE_ID] * 4
    before = H.plan_state(llm)[1]["prefill"]
    got, _ = H.generate(llm, [item], N_NEW)
    assert H.plan_state(llm)[1]["prefill"] - before == -(-len(ids) // 16)  # one step per 16-token chunk
    assert got == f.hf.tokens(f.plans["A"], [item], N_NEW)


def test_vskip_only_plan_keeps_compilation(families):
    """vskip layers change only the attention op, which runs outside vLLM's compiled graph."""
    f = families("llava")
    llm = f.engine("V-compiled", "V", enforce_eager=False)
    cfg = llm.llm_engine.vllm_config
    assert not cfg.model_config.enforce_eager
    assert str(cfg.compilation_config.mode).rsplit(".", 1)[-1] != "NONE"
    items = H.prompts("llava", 6, seed=11)
    got = H.generate(llm, items, N_NEW)[0]
    assert got == f.hf.tokens(f.plans["V"], items, N_NEW)
    assert got != f.hf.tokens(None, items, N_NEW)


def test_eager_is_forced_for_frozen_and_bypass_plans(families):
    """The step-kind branch of frozen/bypassed layers must not be frozen into a compiled graph."""
    f = families("llava")
    llm = f.engine("A-compile-requested", "A", enforce_eager=False)
    assert llm.llm_engine.vllm_config.model_config.enforce_eager
    items = H.prompts("llava", 3, seed=15)
    assert H.generate(llm, items, N_NEW)[0] == f.hf.tokens(f.plans["A"], items, N_NEW)


def test_prefix_cache_hits_one_token_prefill_and_multi_turn(families):
    f = families("llava")
    llm = f.engine("A", "A")  # prefix caching is on by default
    # 61 words + one image (4 tokens) = 65 tokens: two full blocks (with the image) and one more token
    text = H.ck.text_prompt(61, 1301, True)
    item = (text, [H.ck.image(1301)])
    ids = f.hf.encode(*item)["input_ids"][0].tolist()
    assert len(ids) == 2 * H.BLOCK + 1 and IMAGE_ID in ids[: 2 * H.BLOCK]
    ref = f.hf.tokens(f.plans["A"], [item], N_NEW)
    first, outs = H.generate(llm, [item], N_NEW)
    assert first == ref
    # 1) again: the two blocks come from the cache, one prompt token is left: a one-token prefill,
    #    not a decode step (bypassed layers must run on it), with the cached image's kinds known
    before = H.plan_state(llm)[1]
    again, outs = H.generate(llm, [item], N_NEW)
    assert outs[0].num_cached_tokens == 2 * H.BLOCK
    assert again == ref
    assert H.plan_state(llm)[1]["prefill"] == before["prefill"] + 1
    # 2) text-only multi-turn: the answer's blocks must not be served from the cache
    turn1 = f.hf.encode(H.ck.text_prompt(2 * H.BLOCK, 1302, False), [])["input_ids"][0].tolist()
    assert len(turn1) == 2 * H.BLOCK
    ans, _ = H.generate_ids(llm, [turn1], 40)
    ans = ans[0]
    assert IMAGE_ID not in ans  # (LLaVA has no video token: 95 is plain text)
    turn2 = turn1 + ans + [5, 6, 7]
    got2, outs2 = H.generate_ids(llm, [turn2], N_NEW)
    assert outs2[0].num_cached_tokens == 2 * H.BLOCK, "a block holding generated tokens was served from the cache"
    assert got2 == f.hf.tokens(f.plans["A"], prompt_ids=[turn2], n=N_NEW)


def test_64_concurrent_requests_equal_single_runs(families):
    f = families("llava")
    llm = f.engine("A", "A")
    items = H.prompts("llava", 64, seed=14, min_words=2, max_words=50)
    together, _ = H.generate(llm, items, 6)
    alone = [H.generate(llm, [it], 6)[0][0] for it in items]
    assert together == alone
    assert len(set(map(tuple, together))) > 1


def test_calibrated_plan_runs_as_calibrated(families, tmp_path):
    """The user flow: calibrate with transformers (FlashVLM's visual mass picks bypass layers, then
    ShortV's LC frozen layers on top), save, serve the file with vLLM."""
    from vskip_kernels import SkipPlan
    from vskip_kernels.calibrate import calibrate

    f = families("llava")
    items = H.prompts("llava", 3, seed=17, images=(1,))
    batches = [dict(f.hf.encode(t, im)) for t, im in items]
    bypass = calibrate(f.hf.model, batches, "visual_mass", budget=1, max_new_tokens=4, progress=False)
    frozen = calibrate(f.hf.model, batches, "lc", budget=1, progress=False)
    plan = SkipPlan.from_dict({**bypass.to_dict(), "frozen_layers": frozen.frozen_layers})
    assert plan.model.get("architecture") == "LlavaForConditionalGeneration"
    path = str(tmp_path / "calibrated.json")
    plan.save(path)
    f.plans["calibrated"] = path
    llm = f.engine("calibrated", "calibrated")
    test_items = H.prompts("llava", 4, seed=18)
    assert H.generate(llm, test_items, N_NEW)[0] == f.hf.tokens(path, test_items, N_NEW)


# ----------------------------------------------------------------------------- the CUDA path's kernel
# additional_config["vskip_backend"] = "triton": the CPU engine runs the backend through the paged
# Triton kernel (the one CUDA runs by default), in Triton's interpreter (TRITON_INTERPRET=1, set by
# python_tests/conftest.py without a GPU). Few prompts and one engine per family: the interpreter
# is slow.
def _triton_only(llm):
    kernel, calls = H.kernel_state(llm)
    assert kernel == "triton" and calls["triton"] > 0 and calls["torch"] == 0, calls


def test_triton_kernel_tokens_equal_transformers_qwen2_vl(families):
    f = families("qwen2_vl")
    llm = f.engine("A-triton", "A", backend="triton")
    items = H.prompts("qwen2_vl", 3, seed=11)
    assert H.generate(llm, items, N_NEW)[0] == f.hf.tokens(f.plans["A"], items, N_NEW)
    _triton_only(llm)
    counts = H.plan_state(llm)[1]
    assert counts["prefill"] > 0 and counts["decode"] > 0


def test_triton_kernel_tokens_equal_transformers_llava_chunked_and_prefix_hit(families):
    """LLaVA-1.5 under the Triton kernel with a 16-token step budget: chunked prompts (mixed
    prefill/decode steps, images across chunks), then a prefix-cache hit (the cached image's
    kinds read back, a one-token prefill)."""
    f = families("llava")
    llm = f.engine("A-triton-chunked", "A", backend="triton", max_num_batched_tokens=16, max_num_seqs=4)
    items = H.prompts("llava", 3, seed=12, min_words=20, max_words=40, images=(1, 2))
    assert H.generate(llm, items, N_NEW)[0] == f.hf.tokens(f.plans["A"], items, N_NEW)
    counts = H.plan_state(llm)[1]
    assert counts["mixed"] > 0 and counts["decode"] > 0, counts
    item = (H.ck.text_prompt(61, 1301, True), [H.ck.image(1301)])
    ref = f.hf.tokens(f.plans["A"], [item], N_NEW)
    assert H.generate(llm, [item], N_NEW)[0] == ref
    before = H.plan_state(llm)[1]["prefill"]
    again, outs = H.generate(llm, [item], N_NEW)
    assert outs[0].num_cached_tokens == 2 * H.BLOCK
    assert again == ref
    assert H.plan_state(llm)[1]["prefill"] == before + 1
    _triton_only(llm)
