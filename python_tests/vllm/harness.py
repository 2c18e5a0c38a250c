"""Shared pieces of the vLLM tests: tiny checkpoints built once per session, engines, prompts,
and the transformers reference (``apply_skip_plan`` + greedy ``generate``)."""

from __future__ import annotations

import copy
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoints as ck

from vskip_kernels import SkipPlan

BLOCK = 32
MAX_LEN = 512
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_TEXT = {"llava": "<image>", "llava_next": "<image>", "qwen2_vl": _QWEN_IMAGE, "qwen2_5_vl": _QWEN_IMAGE}
BUILDERS = {
    "llava": ck.build_llava,
    "llava_next": ck.build_llava_next,
    "qwen2_vl": ck.build_qwen2_vl,
    "qwen2_5_vl": ck.build_qwen2_5_vl,
}
ARCH = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

# Plans over the 4 decoder layers: every policy, and decode bypass on top of vskip/frozen layers.
PLAN_A = dict(vskip_layers=[0, 3], frozen_layers=[1], decode_bypass_layers=[1, 2])
PLAN_B = dict(frozen_layers=[0, 2], vskip_layers=[1], decode_bypass_layers=[3])
PLAN_C = dict(vskip_layers=[0], frozen_layers=[2], decode_bypass_layers=[1])


def plan_file(tmpdir, name: str, fam: str, **layers) -> str:
    plan = SkipPlan(num_layers=ck.LAYERS, model={"architecture": ARCH[fam]}, **layers)
    path = os.path.join(str(tmpdir), f"{name}.json")
    plan.save(path)
    return path


def prompts(fam: str, n: int, seed: int = 0, min_words: int = 3, max_words: int = 40, images=(0, 1, 2)):
    """n (text, [images]) pairs of different lengths with 0, 1 or 2 images each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        k = images[i % len(images)]
        text = ck.text_prompt(words, seed * 1000 + i, False)
        parts = text.split(" ")
        imgs = []
        for j in range(k):
            at = (j + 1) * len(parts) // (k + 1)
            parts.insert(at + j, IMAGE_TEXT[fam])
            imgs.append(ck.image(seed * 1000 + 10 * i + j))
        out.append((" ".join(parts), imgs))
    return out


def vllm_inputs(items):
    res = []
    for text, imgs in items:
        d = {"prompt": text}
        if imgs:
            d["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
        res.append(d)
    return res


def make_llm(path: str, plan_path: str | None = None, backend: str | None = None, **kw):
    """An in-process vLLM engine on a tiny checkpoint; ``plan_path`` and ``backend`` (the paged
    kernel: "auto", "torch" or "triton") go into ``additional_config`` with any entries given there."""
    from vllm import LLM

    args = dict(
        model=path,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=MAX_LEN,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        enforce_eager=True,
        gpu_memory_utilization=0.5,
    )
    additional = dict(kw.pop("additional_config", None) or {})
    args.update(kw)
    if plan_path is not None:
        additional["vskip_plan"] = plan_path
    if backend is not None:
        additional["vskip_backend"] = backend
    if additional:
        args["additional_config"] = additional
    return LLM(**args)


def close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def generate(llm, items, n: int = 8):
    outs = llm.generate(vllm_inputs(items), greedy(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def generate_ids(llm, prompt_ids: list[list[int]], n: int = 8):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], greedy(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def plan_state(llm):
    """The worker's vskip ModelState summary: (impl class of layer 0, step counts or None)."""

    def probe(worker):
        runner = worker.model_runner
        model = runner.get_model()
        layers = model.language_model.model.layers
        st = getattr(runner, "_vskip_state", None)
        return (type(layers[0].self_attn.attn.impl).__name__, dict(st.step_counts) if st else None)

    return llm.collective_rpc(probe)[0]


def kernel_state(llm):
    """(the paged kernel the worker's ModelState runs, its calls by kernel)."""

    def probe(worker):
        st = worker.model_runner._vskip_state
        return st.kernel, dict(st.kernel_calls)

    return llm.collective_rpc(probe)[0]


class HFReference:
    """A transformers model of a checkpoint; tokens under a plan via ``apply_skip_plan``."""

    def __init__(self, path: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.proc = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def encode(self, text, imgs):
        return self.proc(text=text, images=imgs or None, return_tensors="pt")

    def tokens(self, plan_path: str | None, items=None, n: int = 8, prompt_ids=None):
        from vskip_kernels.hf import apply_skip_plan

        handle = apply_skip_plan(self.model, SkipPlan.load(plan_path), backend="torch") if plan_path else None
        try:
            res = []
            if items is not None:
                encoded = [self.encode(t, im) for t, im in items]
            else:
                encoded = [
                    {"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)}
                    for p in prompt_ids
                ]
            for inp in encoded:
                cfg = copy.deepcopy(self.model.generation_config)
                cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample, cfg.max_new_tokens = None, 0, False, n
                with torch.no_grad():
                    out = self.model.generate(**inp, generation_config=cfg)
                new = out[0, inp["input_ids"].shape[1] :].tolist()
                assert len(new) == n, f"transformers stopped after {len(new)} of {n} tokens"
                res.append(new)
            return res
        finally:
            if handle is not None:
                handle.remove()
