"""The tiny LLaVA model: transformers' own classes, a character tokenizer, a local processor.

Built from ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama
decoder), so everything that works on a LLaVA-1.5 checkpoint (``apply_skip_plan``,
``calibrate``, ``generate``, ``from_pretrained``) works on it unchanged. The trained
weights, config and processor ship in ``weights/`` next to this file.
"""

from __future__ import annotations

import os

import torch

from .task import ANSWERS, IMAGE, QUESTION_WORDS

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline ends the prompt; printable ASCII
PAD, BOS, EOS, UNK, IMAGE_TOKEN = range(len(SPECIALS))
PATCH = 8  # 64 / 8 = 8 x 8 = 64 visual tokens per image, one per grid cell
# Short template: a prompt is 64 image tokens, the question (word tokens) and a newline,
# so a training row is about 80 tokens long and training fits a CPU.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)
# Default architecture: 12 decoder layers so that which layers a plan picks matters.
ARCH = dict(
    layers=12,
    hidden=64,
    heads=4,
    kv_heads=2,
    ffn=192,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    vision_ffn=128,
    initializer_range=0.08,
    vision_initializer_range=0.02,
)


def word_tokens() -> list[str]:
    """Question words as whole tokens: " word" after a space, bare at the start of a question.

    Answers follow a newline, with no space before them, so they are spelled character by
    character: a multi-token answer whose later tokens come from decode steps. Only words
    that can open a question get a bare form, and none of them occurs inside an answer.
    """
    openers = ["what", "how", "is"]
    for w in openers:
        if any(w in a for answers in ANSWERS.values() for a in answers):
            raise AssertionError(f"question opener {w!r} occurs inside an answer")
    return openers + [" " + w for w in QUESTION_WORDS]


def build_tokenizer():
    """Word tokens for the question vocabulary, characters (newline, printable ASCII) otherwise."""
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(word_tokens(), key=len, reverse=True)  # longest first: " circles" before " circle"
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(map(re.escape, words)) + r"|[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


def build_processor():
    """LlavaProcessor for 64 x 64 images (other sizes are resized and cropped to it)."""
    from transformers import LlavaProcessor

    try:
        import torchvision  # noqa: F401  (the default image processor backend needs it)
        from transformers import CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    # The vision tower emits a CLS token that the "default" strategy drops: + 1 - 1.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(num_layers: int | None = None, **arch):
    """LlavaConfig of the tiny model; ``arch`` overrides entries of ``ARCH`` (hidden, ffn, ...)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    unknown = sorted(set(arch) - set(ARCH))
    if unknown:
        raise TypeError(f"unknown architecture keys {unknown}; known: {sorted(ARCH)}")
    a = dict(ARCH, **arch)
    if num_layers is not None:
        a["layers"] = num_layers
    if isinstance(a["layers"], bool) or not isinstance(a["layers"], int) or a["layers"] < 1:
        raise ValueError(f"num_layers must be a positive int, got {a['layers']!r}")
    text = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS) + len(word_tokens()),
        hidden_size=a["hidden"],
        intermediate_size=a["ffn"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"],
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        initializer_range=a["initializer_range"],
    )
    vision = CLIPVisionConfig(
        hidden_size=a["vision_hidden"],
        intermediate_size=a["vision_ffn"],
        num_hidden_layers=a["vision_layers"],
        num_attention_heads=a["vision_heads"],
        image_size=IMAGE,
        patch_size=PATCH,
        initializer_range=a["vision_initializer_range"],
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,  # type: ignore[call-arg]
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=PAD,
    )


def build_model(num_layers: int | None = None, seed: int = 0, **arch):
    """A freshly initialised (untrained) tiny LLaVA, deterministic in ``seed``."""
    from transformers import LlavaForConditionalGeneration

    cfg = build_config(num_layers, **arch)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model.eval()


def load_pretrained(path: str | None = None, device=None, dtype=torch.float32):
    """(model, processor) of the shipped trained model (or of a folder ``train`` wrote)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging

    path = path or WEIGHTS_DIR
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"no trained tiny VLM in {path} (model.safetensors missing); "
            "train one with `python -m vskip_kernels.tinyvlm.train`"
        )
    logging.disable_progress_bar()  # a loading bar per call would clutter the demo's output
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), AutoProcessor.from_pretrained(path)
