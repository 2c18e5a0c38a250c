"""Decoder configurations of the released 7B VLMs, rebuilt in code (no downloads).

Weights are random: a matmul takes as long on random numbers as on trained ones,
and every method here fixes the number of generated tokens, so timings do not
depend on what the weights say. Only the language model is timed: the vision
tower gets a one-layer stand-in because the benchmark feeds ``input_ids`` with
image/video placeholder tokens and no pixels (every method leaves the vision
encoder unchanged, so it would add the same time to all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
QWEN2_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)
CLIP_STANDIN = dict(
    model_type="clip_vision_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
)
SIGLIP_STANDIN = dict(
    model_type="siglip_vision_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=384,
    patch_size=14,
)


@dataclass(frozen=True)
class ModelCase:
    name: str
    family: str  # transformers class name
    num_visual: int
    visual_token: str  # "image" or "video"
    text_before: int = 35
    text_after: int = 40


MODEL_CASES = (
    ModelCase("llava-1.5-7b", "LlavaForConditionalGeneration", 576, "image"),
    ModelCase("llava-next-7b", "LlavaNextForConditionalGeneration", 2880, "image"),
    ModelCase("llava-onevision-7b", "LlavaOnevisionForConditionalGeneration", 7290, "image"),
    ModelCase("qwen2.5-vl-7b-video16k", "Qwen2_5_VLForConditionalGeneration", 16384, "video"),
    ModelCase("qwen2.5-vl-7b-video32k", "Qwen2_5_VLForConditionalGeneration", 32768, "video"),
)
SMOKE_MODEL_CASES = (ModelCase("tiny-llava", "tiny-llava", 24, "image", 6, 8),)


def build_config(case: ModelCase):
    import transformers as tf

    if case.family == "tiny-llava":
        return tf.LlavaConfig(
            text_config=dict(
                model_type="llama",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=256,
                max_position_embeddings=512,
            ),
            vision_config=dict(CLIP_STANDIN, image_size=28),
            image_token_index=250,
        )
    if case.family == "LlavaForConditionalGeneration":
        return tf.LlavaConfig(text_config=dict(LLAMA2_7B), vision_config=dict(CLIP_STANDIN), image_token_index=32000)
    if case.family == "LlavaNextForConditionalGeneration":
        return tf.LlavaNextConfig(
            text_config=dict(LLAMA2_7B), vision_config=dict(CLIP_STANDIN), image_token_index=32000
        )
    if case.family == "LlavaOnevisionForConditionalGeneration":
        text = dict(QWEN2_7B, model_type="qwen2", vocab_size=152128, max_position_embeddings=32768)
        return tf.LlavaOnevisionConfig(text_config=text, vision_config=dict(SIGLIP_STANDIN), image_token_index=151646)
    if case.family == "Qwen2_5_VLForConditionalGeneration":
        text = dict(
            QWEN2_7B,
            vocab_size=152064,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        )
        text.pop("rope_theta")
        vision = dict(
            depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=3584, fullatt_block_indexes=[0]
        )
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    raise ValueError(f"unknown model family {case.family!r}")


def build_model(case: ModelCase, device: torch.device, dtype: torch.dtype):
    """Random-weight model created directly on ``device`` in ``dtype`` (no slow CPU init)."""
    import transformers as tf

    cfg = build_config(case)
    cls = tf.LlavaForConditionalGeneration if case.family == "tiny-llava" else getattr(tf, case.family)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


def visual_token_id(model, case: ModelCase) -> int:
    cfg = model.config
    tok = getattr(cfg, "video_token_id", None) if case.visual_token == "video" else None
    return int(tok if tok is not None else cfg.image_token_id)


def input_ids_for(model, case: ModelCase, device, seed: int = 0) -> torch.Tensor:
    """[1, N]: random text ids around a run of visual placeholder ids."""
    vocab = text_config(model).vocab_size
    specials = {visual_token_id(model, case)}
    for attr in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int):
            specials.add(v)
    hi = min(specials | {vocab})  # placeholder ids sit above the ordinary vocabulary in every family here
    if hi <= 3:
        raise ValueError(f"no room for text ids below the placeholder ids {sorted(specials)}")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, hi, (case.text_before + case.text_after,), generator=g)
    vis = torch.full((case.num_visual,), visual_token_id(model, case), dtype=text.dtype)
    ids = torch.cat([text[: case.text_before], vis, text[case.text_before :]])
    return ids[None].to(device)
