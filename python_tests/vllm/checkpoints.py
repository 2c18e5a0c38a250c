"""Tiny random LLaVA-1.5 / Qwen2-VL checkpoints on disk, with a word-level tokenizer and
an image processor, so vLLM and transformers load the very same files (no downloads).

Head dim 32 and fp32: vLLM's CPU attention needs head dims that are multiples of 32.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_models as hm

HEAD_DIM = 32
LAYERS = 4


def _word(i: int) -> str:
    special = {
        hm.PAD_ID: "<pad>",
        1: "<s>",
        2: "</s>",
        hm.IMAGE_ID: "<image>",
        hm.VIDEO_ID: "<video>",
        hm.VISION_START_ID: "<vs>",
        hm.VISION_END_ID: "<ve>",
    }
    return special.get(i, f"w{i}")


def _tokenizer(renames: dict[str, str] | None = None):
    """Word-level tokenizer over the tiny vocabulary ("w<id>" words); placeholders are added tokens,
    so runs like "<image><image>" split into one token each."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    renames = renames or {}
    vocab = {renames.get(_word(i), _word(i)): i for i in range(hm.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [w for w in vocab if w.startswith("<")]
    tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


def _nest_clip_keys(path: str) -> None:
    """vLLM's LLaVA loader expects the CLIP tower's weights under ``vision_tower.vision_model.``."""
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    out = {}
    for k, v in sd.items():
        if ".vision_tower." in k and ".vision_tower.vision_model." not in k:
            k = k.replace(".vision_tower.", ".vision_tower.vision_model.", 1)
        elif k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        out[k] = v
    save_file(out, f, metadata={"format": "pt"})


def _save_model(path: str, factory, seed: int, layers: int, clip_tower: bool):
    """A tiny random model of ``factory`` saved to ``path`` as vLLM loads it."""
    model = factory(seed=seed, layers=layers, head_dim=HEAD_DIM)
    model.config.text_config.max_position_embeddings = 2048
    model.save_pretrained(path)
    if clip_tower:
        _nest_clip_keys(path)
    return model


def build_llava(path: str, seed: int = 0, layers: int = LAYERS) -> str:
    """LLaVA-1.5 (CLIP tower, Llama decoder); 8x8 images -> 4 image tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    _save_model(path, hm.tiny_llava, seed, layers, clip_tower=True)
    tok = _tokenizer()
    ip = CLIPImageProcessor(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, do_center_crop=True, do_convert_rgb=True
    )
    LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


def build_llava_next(path: str, seed: int = 0, layers: int = LAYERS) -> str:
    """LLaVA-NeXT (anyres tiling over 8x8 tiles, image newline tokens)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    model = _save_model(path, hm.tiny_llava_next, seed, layers, clip_tower=True)
    tok = _tokenizer()
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 8},
        crop_size={"height": 8, "width": 8},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
        do_center_crop=True,
    )
    LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


def _build_qwen(path: str, factory, processor_cls, seed: int, layers: int) -> str:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    _save_model(path, factory, seed, layers, clip_tower=False)
    tok = _tokenizer(
        {"<image>": "<|image_pad|>", "<video>": "<|video_pad|>", "<vs>": "<|vision_start|>", "<ve>": "<|vision_end|>"}
    )
    ip = Qwen2VLImageProcessor(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 4)
    vp = Qwen2VLVideoProcessor(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 4)
    processor_cls(image_processor=ip, tokenizer=tok, video_processor=vp).save_pretrained(path)
    return path


def build_qwen2_vl(path: str, seed: int = 0, layers: int = LAYERS) -> str:
    """Qwen2-VL (M-RoPE); a 8x8 image -> 4x4 patches -> 4 image tokens."""
    from transformers import Qwen2VLProcessor

    return _build_qwen(path, hm.tiny_qwen2_vl, Qwen2VLProcessor, seed, layers)


def build_qwen2_5_vl(path: str, seed: int = 0, layers: int = LAYERS) -> str:
    """Qwen2.5-VL (M-RoPE, windowed vision attention); a 8x8 image -> 4 image tokens."""
    from transformers import Qwen2_5_VLProcessor

    return _build_qwen(path, hm.tiny_qwen2_5_vl, Qwen2_5_VLProcessor, seed, layers)


def text_prompt(n_words: int, seed: int, image: bool, image_token: str = "<image>") -> str:
    g = torch.Generator().manual_seed(seed)
    words = [_word(int(i)) for i in torch.randint(*hm.TEXT_ID_RANGE, (n_words,), generator=g)]
    if image:
        cut = max(1, n_words // 2)
        words = words[:cut] + [image_token] + words[cut:]
    return " ".join(words)


def image(seed: int, size: int = 8):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
