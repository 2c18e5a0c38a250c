"""``vskip demo``: the whole workflow on a small random LLaVA model, with nothing to download.

A LLaVA-1.5-style model (CLIP vision tower, Llama decoder) with random weights and a
character-level tokenizer is built locally; random PIL images go through a real
``LlavaProcessor`` and the model's chat template. Every calibration method picks a plan
on some images; each plan is then applied to the same patched model (``set_plan``) and
greedy generation on other images is timed and compared with the dense model.

Random weights make the numbers a smoke test of the machinery, not of quality: token
agreement says how far a plan moves this model's greedy output, nothing more.
"""
from __future__ import annotations

import time

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
PROMPTS = ["describe the image.", "what is in the picture?", "read the text in it.", "how many objects are there?",
           "what colour dominates?", "where was this taken?", "is it day or night?", "name the main object."]

# (text hidden, heads, kv heads, FFN, image side) per size; patch 14 as in LLaVA-1.5.
SIZES = {
    "tiny": dict(hidden=64, heads=4, kv_heads=2, ffn=128, image=56),       # 16 visual tokens, CPU
    "small": dict(hidden=1024, heads=16, kv_heads=4, ffn=2816, image=336),  # 576 visual tokens, GPU
}
PATCH = 14


def build_tokenizer():
    """Character-level fast tokenizer with LLaVA's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"], padding_side="left")


def build_processor(size: str = "tiny"):
    from transformers import LlavaProcessor

    try:
        import torchvision  # noqa: F401  (the default image processor backend needs it)
        from transformers import CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    side = SIZES[size]["image"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    # The vision tower emits a CLS token that the "default" strategy drops: + 1 - 1.
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(num_layers: int = 8, seed: int = 0, size: str = "tiny"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SIZES[size]
    vocab = len(SPECIALS) + 95
    text = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["ffn"],
                       num_hidden_layers=num_layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=s["image"], patch_size=PATCH)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=SPECIALS.index("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                # Wider than the default init (std 0.02) so attention is peaked and the
                # layers differ; otherwise every random layer looks alike and plans tie.
                p.copy_(torch.randn(p.shape, generator=g) * (2.5 / p[0].numel() ** 0.5))
            elif ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_demo(num_layers: int = 8, seed: int = 0, size: str = "tiny"):
    """(model, processor): a random LLaVA-style model and a matching local processor."""
    return build_model(num_layers, seed, size), build_processor(size)


def random_images(n: int, seed: int = 0):
    """n random RGB images of varied sizes (the processor resizes and crops them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-60, 60, size=(h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model, inputs, tokens: int, repeats: int):
    """(sequences, best wall time in ms) of greedy generation of exactly ``tokens`` tokens."""
    dev = inputs["input_ids"].device
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        _sync(dev)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return out, best


def run_demo(*, quick: bool = False, layers: int = 8, budget: int | None = None, max_new_tokens: int | None = None,
             device: str | None = None, seed: int = 0, progress: bool = True, out=print) -> list[dict]:
    """Calibrate with every method, apply each plan, generate, print and return the comparison."""
    from .calibrate import METHODS, calibrate
    from .calibrate._common import TARGET_FIELDS, prepare
    from .calibrate.data import encode
    from .hf import apply_skip_plan
    from .plan import SkipPlan

    if layers < 2:
        raise ValueError(f"layers must be >= 2 for the demo, got {layers}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    size = "small" if gpu else "tiny"
    dtype = torch.bfloat16 if gpu else torch.float32
    n_cal, n_eval = (2, 2) if quick else (8, 4)
    tokens = max_new_tokens or (6 if quick else 24)
    if tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 to time decode steps, got {tokens}")
    repeats = 1 if quick else 3
    k = budget if budget is not None else max(1, layers // 4)

    model, processor = build_demo(layers, seed, size)
    model = model.to(dev, dtype)
    imgs = random_images(n_cal + n_eval, seed)
    # one prompt per image, cycling through PROMPTS when there are more images than prompts
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_cal + n_eval)]
    cal = [prepare(encode(processor, prompts[i:i + 2], [[im] for im in imgs[i:i + 2]]), model)
           for i in range(0, n_cal, 2)]
    ev = prepare(encode(processor, prompts[n_cal:], [[im] for im in imgs[n_cal:]]), model)
    n_vis = int((ev["input_ids"][0] == model.config.image_token_id).sum())
    out(f"model: random LLaVA ({size}), {layers} decoder layers, {n_vis} visual tokens per image, {dtype} on {dev}; "
        f"plans of {k} layers; calibration on {n_cal} images, {tokens} tokens generated for {n_eval}")

    plans = {"dense": SkipPlan(num_layers=layers)}
    for m in METHODS:
        plans[m] = calibrate(model, cal, m, budget=k, seed=seed, max_new_tokens=tokens, progress=progress)

    handle = apply_skip_plan(model, plans["dense"])
    rows = []
    try:
        with torch.no_grad():
            if gpu:  # compile the kernels of every policy before anything is timed
                for plan in plans.values():
                    handle.set_plan(plan)
                    _timed_generate(model, ev, 2, 1)
            dense_seq = None
            for name, plan in plans.items():
                handle.set_plan(plan)
                _, prefill = _timed_generate(model, ev, 1, repeats)
                seq, total = _timed_generate(model, ev, tokens, repeats)
                gen = seq[:, ev["input_ids"].shape[1]:]
                if dense_seq is None:
                    dense_seq = gen
                target = next((t for t, f in TARGET_FIELDS.items() if getattr(plan, f)), "-")
                rows.append({
                    "method": name,
                    "target": target,
                    "layers": getattr(plan, TARGET_FIELDS[target]) if target != "-" else [],
                    "prefill_ms": prefill,
                    "decode_ms_per_token": max(total - prefill, 0.0) / (tokens - 1),
                    "agreement": float((gen == dense_seq).float().mean()),
                })
    finally:
        handle.remove()

    out(f"{'method':<12} {'mode':<14} {'layers':<16} {'prefill ms':>10} {'decode ms/tok':>13} {'agreement':>9}")
    for r in rows:
        out(f"{r['method']:<12} {r['target']:<14} {str(r['layers']):<16} {r['prefill_ms']:>10.2f} "
            f"{r['decode_ms_per_token']:>13.2f} {r['agreement'] * 100:>8.1f}%")
    return rows
